"""The ``lmforge`` command line: thin verbs over the library.

    lmforge quickstart [--fresh]
    lmforge data prepare CONFIG [--set key=value ...] [--overwrite]
    lmforge train CONFIG [--set key=value ...] [--resume auto|PATH] [--max-restarts N]
    lmforge eval RUN_OR_CHECKPOINT [--weights raw|ema|window] [--seq-len N] [--by-position] [--passkey]
    lmforge generate RUN_OR_CHECKPOINT --prompt TEXT [--weights raw|ema|window]
    lmforge report RUN
    lmforge export RUN_OR_CHECKPOINT --out DIR [--weights raw|ema|window]
    lmforge ladder CONFIG [--workers K] [--holdout-largest]
    lmforge continual CONFIG
    lmforge continual-knowledge CONFIG
    lmforge synth CONFIG [--overwrite] | lmforge synth-collapse CONFIG
    lmforge scaling fit CSV | lmforge scaling plan --compute C
    lmforge retrieval build|add|remove|neighbours|info|train|eval|facts|train-query-encoder ...

CONFIG is a YAML file; a bare name without a folder (``quickstart`` or ``quickstart.yaml``)
also finds the preset in ``configs/``. Bad input ends in one line ``lmforge: error: ...``
(or argparse's usage error) and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import typing

from lmforge.cli.arguments import (SET_HELP, add_config_args, add_train_args, name_list, train_overrides,
                                   non_negative_float, non_negative_int, positive_int)
from lmforge.core.errors import LmforgeError


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (exit code 2) naming the option, with a
    pointer to --help instead of the full usage block; subcommand parsers inherit it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_weights_arg(parser: argparse.ArgumentParser) -> None:
    """``--weights``: which weights of a checkpoint to load (train/averaging.py keeps the averages)."""
    parser.add_argument("--weights", choices=("raw", "ema", "window"), default="raw",
                        help="the trained weights (raw, default), their exponential moving average (ema) or "
                             "their mean over the last steps (window); the averages exist when the run set "
                             "train.weight_averaging")


def _length_list(text: str) -> list[int]:
    """``64,128,256``: token counts of at least 8."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 8:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 8, got {text!r}")
    return values


def _add_long_context_args(ev: argparse.ArgumentParser) -> None:
    """``lmforge eval`` options of the long-context evaluations (docs/long_context.md)."""
    group = ev.add_argument_group("long context")
    group.add_argument("--seq-len", type=positive_int, default=None, metavar="N",
                       help="evaluate with windows of N tokens instead of the run's train.seq_len, e.g. 4x after "
                            "context extension (the model is built for N positions if it was trained shorter); "
                            "written to eval/<checkpoint>.seqN.json")
    group.add_argument("--by-position", action="store_true",
                       help="held-out loss by position in the window, in buckets (on by default unless the run "
                            "set eval.position_bucket: 0; this turns it on with buckets of 64)")
    group.add_argument("--position-bucket", type=positive_int, default=None, metavar="W",
                       help="positions per bucket of the loss by position (default: eval.position_bucket, 64)")
    group.add_argument("--passkey", action="store_true",
                       help="passkey retrieval: accuracy over a length x depth grid, single and multi-key "
                            "(settings: eval.passkey of the run, else defaults); also writes a heatmap PNG")
    group.add_argument("--passkey-lengths", type=_length_list, default=None, metavar="L1,L2",
                       help="passkey item lengths in tokens (default: N/4, N/2 and N for the evaluated length N)")
    group.add_argument("--passkey-items", type=positive_int, default=None, metavar="K",
                       help="passkey items per grid cell and variant (default 20)")
    group.add_argument("--passkey-filler", default=None, metavar="words|DOMAIN",
                       help="passkey haystack: random word sentences (words, default) or a domain's held-out text")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="lmforge",
        description="lmforge: a compact, complete language-model pretraining system.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    quick = verbs.add_parser("quickstart", help="prepare the demo corpus, train a small model, evaluate, report",
                             description="End to end on the demo corpus (Shakespeare, Milton, Python stdlib): "
                                         "data preparation, tokenizer, shards, a small dense model (Muon, WSD), held-out "
                                         "bits-per-byte, samples and runs/quickstart/report.html.")
    quick.add_argument("--config", default=None,
                       help="config to run: a YAML file, or a preset name from configs/ (default: quickstart)")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    quick.add_argument("--fresh", action="store_true",
                       help="delete runs/<name> first, so the quickstart can be rerun from scratch")

    data = verbs.add_parser("data", help="data preparation").add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    prep = data.add_parser("prepare", help="read sources, dedup, split, train tokenizer, write shards",
                           description="Prepare the data section of CONFIG (a run config with a `data:` "
                                       "section, or a data config) into its out_dir. Finished shards are "
                                       "skipped on rerun.")
    add_config_args(prep)
    prep.add_argument("--overwrite", action="store_true",
                      help="replace prepared data in out_dir that came from a different config")

    train = verbs.add_parser("train", help="train a model from a run config",
                             description="Train the model described by CONFIG. Writes runs/<name>/ "
                                         "(config, metrics.jsonl, TensorBoard, checkpoints, eval).")
    add_train_args(train)

    ev = verbs.add_parser("eval", help="held-out bits-per-byte per domain, isolation check, samples",
                          description="Evaluate a run (its newest valid checkpoint) or a checkpoint directory.")
    ev.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint directory")
    _add_weights_arg(ev)
    ev.add_argument("--max-tokens", type=positive_int, default=None,
                    help="held-out tokens per domain (default: the run's eval config)")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ev.add_argument("--lm-eval-tasks", type=name_list, default=None, metavar="T1,T2",
                    help="also run these lm-evaluation-harness tasks (needs `pip install lm-eval`)")
    ev.add_argument("--lm-eval-include", default=None, metavar="DIR",
                    help="folder of local lm-eval task YAML files (offline tasks)")
    ev.add_argument("--limit", type=positive_int, default=None, help="lm-eval: at most this many examples per task")
    _add_long_context_args(ev)

    gen = verbs.add_parser("generate", help="sample text from a trained model",
                           description="Generate a continuation of --prompt with a KV cache.")
    gen.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint directory")
    gen.add_argument("--prompt", default=None, help="text to continue (may be empty with --image)")
    gen.add_argument("--image", default=None, metavar="PATH",
                     help="multimodal models: an image file read before the prompt (e.g. to caption it)")
    gen.add_argument("--image-out", default=None, metavar="PNG",
                     help="multimodal models: generate an image after the prompt and save it as PNG")
    gen.add_argument("--image-scale", type=positive_int, default=1, help="--image-out: upscale factor (default 1)")
    _add_weights_arg(gen)
    gen.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate (default 100)")
    gen.add_argument("--temperature", type=non_negative_float, default=0.8,
                     help="sampling temperature; 0 is greedy (default 0.8)")
    gen.add_argument("--top-k", type=non_negative_int, default=40,
                     help="sample among the k most likely tokens (default 40; 0 = all)")
    gen.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")

    rep = verbs.add_parser("report", help="write runs/<name>/report.html",
                           description="Render the run's metrics, evaluation, model card and data into one HTML file.")
    rep.add_argument("run", help="run directory")

    exp = verbs.add_parser("export", help="write a Hugging Face transformers model folder",
                           description="Export a run (its newest valid checkpoint) or a checkpoint as a "
                                       "transformers model: Llama / Qwen3 (dense) or Mixtral / Qwen3-MoE, with "
                                       "safetensors weights and the tokenizer. The export is reloaded and its "
                                       "logits checked against lmforge's before it is kept.")
    exp.add_argument("target", metavar="RUN_OR_CHECKPOINT", help="run directory or checkpoint directory")
    exp.add_argument("--out", required=True, help="folder to create (loadable with AutoModelForCausalLM.from_pretrained)")
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_weights_arg(exp)

    mix = verbs.add_parser("mixture-sweep", help="short runs over several data mixtures, bpb per domain",
                           description="Train one short run per --mixture (source weights replaced in CONFIG) "
                                       "and write sweep.csv and sweep.png: held-out bits-per-byte per domain "
                                       "and planned epochs per source. Finished runs are reused.")
    add_config_args(mix)
    mix.add_argument("--mixture", action="append", required=True, metavar="SRC=W,SRC=W",
                     help="source weights of one run, e.g. literature=3,code=1 (repeat for each run)")
    mix.add_argument("--out", default=None, help="output folder (default runs/<name>_mixture_sweep)")

    cont = verbs.add_parser("continual", help="continual pretraining: parent, continuations with replay, union",
                            description="Train a parent on one domain, continue it on another with each replay "
                                        "share, and a union baseline from scratch (the config's continual: "
                                        "section); write continual.csv/.md/.png with forgetting and adaptation. "
                                        "Finished runs are reused. See docs/continual.md.")
    add_config_args(cont)
    cont.add_argument("--out", default=None, help="output folder (default runs/<name>_continual)")

    know = verbs.add_parser("continual-knowledge", help="facts into the weights (continued training) vs the database",
                            description="Continue a dense model on invented fact documents (each replay share), "
                                        "add and remove them in a RETRO database, continue the facts model on its "
                                        "old data; fact accuracy, held-out forgetting and seconds of each route "
                                        "(the config's knowledge: section). Writes knowledge.json/.md. "
                                        "See docs/continual.md.")
    add_config_args(know)
    know.add_argument("--out", default=None, help="output folder (default runs/<name>_knowledge)")

    from lmforge.cli.retrieval import add_retrieval_parser
    from lmforge.cli.scaling import add_ladder_parser, add_scaling_parser

    add_scaling_parser(verbs)
    add_ladder_parser(verbs)  # `lmforge ladder CONFIG` = `lmforge scaling ladder CONFIG`
    add_retrieval_parser(verbs)
    from lmforge.cli.synth import add_synth_parsers

    add_synth_parsers(verbs)
    return parser


def _run_scaling(args: argparse.Namespace) -> int:
    from lmforge.cli.scaling import run_scaling

    return run_scaling(args)


def _run_retrieval(args: argparse.Namespace) -> int:
    from lmforge.cli.retrieval import run_retrieval

    return run_retrieval(args)


def _run_synth(args: argparse.Namespace) -> int:
    from lmforge.cli import synth

    return synth.synth(args) if args.verb == "synth" else synth.synth_collapse(args)


def _trains(args: argparse.Namespace) -> bool:
    """``lmforge train`` or its alias ``lmforge retrieval train``."""
    return args.verb == "train" or (args.verb == "retrieval" and args.retrieval_verb == "train")


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The ``lmforge train`` arguments of a parsed train command, without --resume and --max-restarts."""
    argv = [args.config]
    for override in train_overrides(args):
        argv += ["--set", override]
    return argv + (["--no-report"] if args.no_report else [])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if _trains(args) and args.max_restarts > 0:
        from lmforge.train.supervisor import supervise

        return supervise(_train_argv(args), args.max_restarts, args.resume)
    from lmforge.cli import commands

    handler = {
        "quickstart": commands.quickstart,
        "data": commands.data_prepare,
        "train": commands.train,
        "eval": commands.evaluate,
        "generate": commands.generate,
        "report": commands.report,
        "scaling": _run_scaling,
        "ladder": _run_scaling,
        "mixture-sweep": commands.mixture_sweep,
        "continual": commands.continual,
        "continual-knowledge": commands.continual_knowledge,
        "export": commands.export,
        "retrieval": _run_retrieval,
        "synth": _run_synth,
        "synth-collapse": _run_synth,
    }[args.verb]
    try:
        code = handler(args) or 0
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        code = getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        code = 130
    from lmforge.core import distributed

    if distributed.joined():
        distributed.exit_process(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

