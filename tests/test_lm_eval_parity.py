"""Evaluation parity: a local lm-eval task scored through lmforge's adapter (``LmforgeLM``) gets
exactly the numbers lm-evaluation-harness's own Hugging Face backend (``--model hf``) gets on
the folder ``lmforge export`` writes; and ``transformers`` generation from that folder equals
``lmforge generate`` and stops at end-of-text.

One tiny dense model is trained on short documents (a few words each, so end-of-text is a
token it learns to emit), exported, and used by every test here.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # lm-eval's hf backend imports it

from conftest import WORDS, run_cli, tiny_run_dict, write_config  # noqa: E402

MAX_SEQ_LEN = 32


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """(run directory, export folder) of a tiny dense model trained on short documents."""
    from lmforge.export.hf import export_hf
    from lmforge.serve.loading import load_for_inference

    tmp = tmp_path_factory.mktemp("parity")
    rng = random.Random(0)
    for domain in ("prose", "code"):
        (tmp / "corpus" / domain).mkdir(parents=True)
    for i in range(120):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))).capitalize() + ".\n"
        (tmp / "corpus" / "prose" / f"doc_{i:03d}.txt").write_text(sentence)
        code = f"def {rng.choice(WORDS)}(x):\n    return x * {rng.randint(1, 9)}\n"
        (tmp / "corpus" / "code" / f"doc_{i:03d}.txt").write_text(code)
    cfg = tiny_run_dict(
        tmp, tmp / "corpus",
        data={"quality": {"enabled": False}, "heldout_fraction": 0.1},  # the documents are one line each
        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": MAX_SEQ_LEN, "moe": None},
        optim={"lr": 0.01, "warmup_steps": 2},
        train={"steps": 40, "batch_size": 8, "seq_len": MAX_SEQ_LEN, "log_every": 10, "eval_every": 0,
               "checkpoint_every": 0, "tensorboard": False})
    result = run_cli("train", str(write_config(tmp / "run.yaml", cfg)), "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp / "runs" / "tiny"
    model, _, _, checkpoint = load_for_inference(run, torch.device("cpu"))
    export_hf(model, model.cfg, checkpoint / "tokenizer.json", tmp / "hf")
    return run, tmp / "hf"


# -- the local tasks: every output type, with the inputs where backends tend to differ --

MC_DOCS = [  # contexts ending in whitespace of every kind, and an empty one
    {"context": "def king(x):\n    ", "choices": ["return x * 3", "the queen", "sword castle"], "answer": 0},
    {"context": "The king and the queen\n", "choices": ["River night.", "def f(x):", "x * 2"], "answer": 0},
    {"context": "Sword castle\t", "choices": ["river.", "return", "storm ship."], "answer": 2},
    {"context": "The ghost and the ", "choices": ["crown.", "x * 9", "def"], "answer": 0},
    {"context": "", "choices": ["The king.", "return x", "(x):"], "answer": 0},
    {"context": "Night morning love\n\n", "choices": ["War peace.", "return x * 1", "):"], "answer": 0},
    {"context": "def storm(x):\n    return x *  ", "choices": ["4", "queen", "sea fire"], "answer": 0},
    {"context": "Island letter garden", "choices": ["honour.", "shadow friend.", "\n    return x"], "answer": 1},
]
LOGLIKELIHOOD_DOCS = [
    {"context": "def ship(x):\n    ", "target": "return x * 5"},
    {"context": "", "target": "The enemy ship."},
    {"context": "The sea fire stone", "target": " bird song."},
    {"context": "Crown ghost\n", "target": "Storm island."},
]
ROLLING_DOCS = [  # longer than the model's context: several windows, the last one partial
    {"text": " ".join(WORDS[:20]).capitalize() + ".\n    def king(x):\n        return x * 2\n" * 2},
    {"text": "The king."},
    {"text": "def sword(x):\n    return x * 7\n\n" + " ".join(reversed(WORDS)) + "\n"},
]
GENERATE_DOCS = [  # prompts of different lengths (one longer than max_seq_len - max_gen_toks)
    {"prompt": "Sword", "answer": ""},
    {"prompt": "The king", "answer": "s"},
    {"prompt": "def ship(x):\n    ", "answer": "return x * 5"},
    {"prompt": "def ship(x):\n    return x * 5\n" * 3 + "def sea(x):\n    ", "answer": "return x"},
]  # no empty prompt: the hf backend pads it to a row it cannot attend to (lmforge starts from end-of-text)

TASKS = {
    "parity_mc": ("multiple_choice", MC_DOCS,
                  'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                  "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
    "parity_loglikelihood": ("loglikelihood", LOGLIKELIHOOD_DOCS,
                             'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\ntarget_delimiter: ""\n'
                             "metric_list:\n  - metric: perplexity\n  - metric: acc\n"),
    "parity_rolling": ("loglikelihood_rolling", ROLLING_DOCS,
                       'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                       "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                       "  - metric: bits_per_byte\n"),
    "parity_generate": ("generate_until", GENERATE_DOCS,
                        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                        'generation_kwargs:\n  until: ["\\n\\n", "."]\n  max_gen_toks: 10\n  do_sample: false\n'
                        "metric_list:\n  - metric: exact_match\n"),
}


def write_tasks(folder, names):
    folder.mkdir(exist_ok=True)
    for name in names:
        output_type, docs, fields = TASKS[name]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {folder / f'{name}.jsonl'}\n"
            f"test_split: test\noutput_type: {output_type}\n{fields}")
    return folder


def evaluate_both_ways(run, export_dir, tasks_dir, names):
    """lm-eval's results through the adapter and through the hf backend on the export."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.serve.lm_eval_adapter import LmforgeLM

    common = dict(tasks=list(names), task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True,
                  batch_size=3)  # several batches, each with prompts of different lengths
    ours = lm_eval.simple_evaluate(model=LmforgeLM(str(run), batch_size=3), **common)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export_dir},dtype=float32", device="cpu",
                                     **common)
    return ours, theirs


COUNTED = ("acc", "acc_norm", "exact_match")  # metrics that count items: identical, not merely close


def assert_same_scores(ours, theirs, names):
    for name in names:
        ours_samples = sorted(ours["samples"][name], key=lambda s: s["doc_id"])
        theirs_samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert [s["arguments"] for s in ours_samples] == [s["arguments"] for s in theirs_samples]
        for mine, hf in zip(ours_samples, theirs_samples):
            for (our_answer,), (their_answer,) in zip(mine["resps"], hf["resps"], strict=True):
                if isinstance(our_answer, str):  # generate_until: the same text
                    assert our_answer == their_answer, (name, mine["doc_id"])
                    continue
                our_answer = our_answer if isinstance(our_answer, (list, tuple)) else [our_answer]
                their_answer = their_answer if isinstance(their_answer, (list, tuple)) else [their_answer]
                assert our_answer[0] == pytest.approx(their_answer[0], abs=1e-4), (name, mine["doc_id"])
                assert our_answer[1:] == their_answer[1:], (name, mine["doc_id"])  # is_greedy
        ours_metrics, theirs_metrics = ours["results"][name], theirs["results"][name]
        numbers = {k for k, v in theirs_metrics.items() if isinstance(v, (int, float)) and "," in k}
        assert numbers and numbers == {k for k, v in ours_metrics.items() if isinstance(v, (int, float)) and "," in k}
        for key in numbers:
            metric = key.split(",")[0].removesuffix("_stderr")
            if metric in COUNTED or math.isnan(theirs_metrics[key]):
                assert ours_metrics[key] == theirs_metrics[key] or (
                    math.isnan(ours_metrics[key]) and math.isnan(theirs_metrics[key])), (name, key)
            else:  # a function of the log-likelihoods above
                assert ours_metrics[key] == pytest.approx(theirs_metrics[key], rel=1e-5), (name, key)


def test_every_output_type_scores_exactly_as_the_hf_backend(tmp_path, exported_run):
    """Multiple choice with contexts ending in newline plus indentation (the issue's case: acc
    and acc_norm identical), plain log-likelihood, rolling perplexity and generation."""
    run, export_dir = exported_run
    names = list(TASKS)
    ours, theirs = evaluate_both_ways(run, export_dir, write_tasks(tmp_path / "tasks", names), names)
    assert_same_scores(ours, theirs, names)
    assert {"acc,none", "acc_norm,none"} <= set(ours["results"]["parity_mc"])
    generated = [s["resps"][0][0] for s in sorted(ours["samples"]["parity_generate"], key=lambda s: s["doc_id"])]
    assert any(generated) and all(len(text) < 80 for text in generated)  # real text, cut at the stops


def test_adapter_requests_follow_the_harness_rules(exported_run):
    """The three request types on the adapter alone, against the harness's rules written out."""
    from lm_eval.api.instance import Instance

    from lmforge.core.errors import LmforgeError
    from lmforge.nn.generation import generate
    from lmforge.nn.scoring import score_continuations
    from lmforge.serve.lm_eval_adapter import LmforgeLM

    run, _ = exported_run
    lm = LmforgeLM(str(run), batch_size=2)
    tok, eos = lm.tokenizer, lm.tokenizer.eos_id

    def request(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    # loglikelihood: all trailing whitespace moves to the continuation; empty context -> end-of-text
    (ll, _), (empty_ll, _) = lm.loglikelihood([request("loglikelihood", "def f(x):\n    ", "return x"),
                                               request("loglikelihood", "", "The king.")], disable_tqdm=True)
    whole = tok.encode("def f(x):\n    return x")
    context = tok.encode("def f(x):")
    [(expected, _), (expected_empty, _)] = score_continuations(
        lm.model, [(context, whole[len(context):]), ([eos], tok.encode("The king."))])
    assert ll == pytest.approx(expected, abs=1e-6) and empty_ll == pytest.approx(expected_empty, abs=1e-6)

    # loglikelihood_rolling: first window from end-of-text, later ones filled up to a full context
    text = " ".join(WORDS) * 2
    ids = tok.encode(text)
    assert len(ids) > 2 * MAX_SEQ_LEN
    windows = [([eos], ids[:MAX_SEQ_LEN])]
    start = MAX_SEQ_LEN
    while start < len(ids):
        end = min(start + MAX_SEQ_LEN, len(ids))
        windows.append((ids[end - MAX_SEQ_LEN - 1:start], ids[start:end]))
        start = end
    assert len(windows[-1][0]) + len(windows[-1][1]) == MAX_SEQ_LEN + 1  # the last one sees a full context
    [rolling] = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    assert rolling == pytest.approx(sum(lp for lp, _ in score_continuations(lm.model, windows)), abs=1e-4)

    # generate_until: a stop string cuts the text before its first occurrence; end-of-text is
    # always a stop; too long a generation is refused, naming the option
    [free] = lm.generate_until([request("generate_until", "The king", {"until": [], "max_gen_toks": 12})])
    assert len(free) >= 6, free
    stop = free[len(free) // 2:len(free) // 2 + 2]
    [stopped] = lm.generate_until([request("generate_until", "The king", {"until": stop, "max_gen_toks": 12})])
    assert stopped == free.split(stop)[0] and len(stopped) < len(free)
    def greedy_text(prompt_ids, n):
        new = generate(lm.model, torch.tensor([prompt_ids], dtype=torch.long), n, temperature=0, eos_id=eos)
        new = new[0, len(prompt_ids):].tolist()
        return tok.decode(new[: new.index(eos)] if eos in new else new)

    # a long prompt keeps its last max_seq_len - max_gen_toks tokens, so the whole fits the model
    long_prompt = "def ship(x):\n    return x * 5\n" * 4
    assert len(tok.encode(long_prompt)) > MAX_SEQ_LEN
    [got] = lm.generate_until([request("generate_until", long_prompt, {"until": [], "max_gen_toks": 8})])
    assert got == greedy_text(tok.encode(long_prompt)[-(MAX_SEQ_LEN - 8):], 8)
    # an empty prompt starts from end-of-text, as `lmforge generate` does
    [from_nothing] = lm.generate_until([request("generate_until", "", {"until": [], "max_gen_toks": 12})])
    assert from_nothing == greedy_text([], 12)
    with pytest.raises(LmforgeError, match="max_gen_toks"):
        lm.generate_until([request("generate_until", "The king", {"until": [], "max_gen_toks": MAX_SEQ_LEN})])


def test_transformers_greedy_generation_from_the_export_stops_at_end_of_text_like_lmforge(exported_run):
    import transformers

    from lmforge.nn.generation import generate
    from lmforge.serve.loading import load_for_inference

    run, export_dir = exported_run
    for name, expected in (("config.json", {"eos_token_id": 0, "bos_token_id": 0}),
                           ("generation_config.json", {"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0})):
        written = json.loads((export_dir / name).read_text())
        assert {key: written.get(key) for key in expected} == expected, name
    model, tok, _, _ = load_for_inference(run, torch.device("cpu"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
    max_new = MAX_SEQ_LEN - 8
    ended = []
    for prompt in ("Sword", "The king", "def ship(x):\n", "Night", "Garden", "The sea"):
        ids = tok.encode(prompt)
        assert hf_tok(prompt)["input_ids"] == ids
        ours = generate(model, torch.tensor([ids]), max_new, temperature=0, eos_id=tok.eos_id)[0, len(ids):].tolist()
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids):].tolist()
        assert theirs == ours, prompt
        if tok.eos_id in ours:  # lmforge stopped at end-of-text: transformers stopped there too
            assert ours.index(tok.eos_id) == len(ours) - 1 and theirs[-1] == tok.eos_id
            ended.append(prompt)
    # The model writes one-line documents, so some greedy continuations end the document.
    assert ended, "no prompt reached end-of-text; the test model no longer emits it"
    # The command line's greedy text is the same as transformers' decoded output.
    result = run_cli("generate", str(run), "--prompt", ended[0], "--temperature", "0",
                     "--max-new-tokens", str(max_new))
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        theirs = hf.generate(**hf_tok(ended[0], return_tensors="pt"), max_new_tokens=max_new, do_sample=False)
    new_text = hf_tok.decode(theirs[0, len(tok.encode(ended[0])):], skip_special_tokens=True)
    assert result.stdout == ended[0] + new_text + "\n"
