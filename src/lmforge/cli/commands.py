"""Implementations of the CLI verbs (kept apart from argument parsing)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmforge.core.config import apply_overrides, read_yaml
from lmforge.core.device import resolve_device
from lmforge.core.errors import ConfigError
from lmforge.core.io import atomic_write_json
from lmforge.core.logging import get_logger

log = get_logger("lmforge.cli")


def repo_configs_dir() -> Path:
    """``configs/`` of the source checkout: presets live there, not in code."""
    return Path(__file__).resolve().parents[3] / "configs"


def find_config(name: str) -> Path:
    """The config file ``name``; a bare name without a folder (``quickstart``, ``quickstart.yaml``)
    that is not a file here is a preset of ``configs/``. A path with a folder must exist as given:
    ``/elsewhere/debug.yaml`` never silently means ``configs/debug.yaml``."""
    path = Path(name)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"config {name}: not a file")
    if name and path.name == name:  # no folder part: look among the presets
        presets = repo_configs_dir()
        for candidate in (presets / name, presets / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
        known = ", ".join(sorted(p.stem for p in presets.glob("*.yaml"))) or "none"
        raise ConfigError(f"config file not found: {name} (not a file here, nor a preset in configs/: {known})")
    raise ConfigError(f"config file not found: {name}")


def load_run_config(path: str, overrides: list[str]):
    from lmforge.train.config import RunConfig

    return RunConfig.from_dict(apply_overrides(read_yaml(find_config(path)), overrides))


def data_prepare(args: argparse.Namespace) -> int:
    from lmforge.data.config import DataConfig
    from lmforge.data.prepare import prepare_data

    raw = apply_overrides(read_yaml(find_config(args.config)), args.overrides)
    section = raw["data"] if "data" in raw else raw
    cfg = DataConfig.from_dict(section, path="data" if "data" in raw else "")
    manifest = prepare_data(cfg, overwrite=args.overwrite)
    if manifest.get("status") == "submitted":  # executor: slurm
        print(f"submitted {len(manifest.get('stages', []))} Slurm stages: {manifest.get('stages')}")
        print(f"logs: {manifest.get('logs')}; rerun the same command when they finish to collect the manifest")
        return 0
    print(f"{'source':<14}{'split':<9}{'documents':>10}{'tokens':>12}{'bytes':>13}{'duplicates':>12}")
    for name, splits in manifest["sources"].items():
        dups = manifest.get("pipeline", {}).get(name, {}).get("removed_duplicates", 0)
        for split, info in splits.items():
            print(f"{name:<14}{split:<9}{info['documents']:>10}{info['tokens']:>12}{info['bytes']:>13}"
                  f"{dups if split == 'train' else '':>12}")
    totals = manifest.get("totals", {})
    print(f"removed: {totals.get('removed_quality', 0)} by quality filters, "
          f"{totals.get('removed_near_duplicates', 0)} near-duplicates, "
          f"{totals.get('removed_contaminated', 0)} contaminated by eval sets"
          + (f" (report: {cfg.out_dir}/contamination.json)" if cfg.decontamination.enabled else ""))
    iso = manifest["isolation"]
    print(f"isolation: {iso['overlap']} of {iso['heldout_docs']} held-out documents in the training split")
    print(f"written: {cfg.out_dir}/manifest.json")
    return 0


def _train(cfg, resume: str | None, write_html: bool) -> Path:
    from lmforge.core import distributed
    from lmforge.train.assembly import train_run

    run_dir = train_run(cfg, resume)
    if write_html and distributed.is_main_process():
        from lmforge.report import write_report

        print(f"report: {write_report(run_dir)}")
    return run_dir


def train(args: argparse.Namespace) -> int:
    from lmforge.cli.arguments import train_overrides

    cfg = load_run_config(args.config, train_overrides(args))
    _train(cfg, args.resume, not args.no_report)
    return 0


def quickstart(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config or "quickstart.yaml", args.overrides)
    from lmforge.train.run_dir import remove_run_dir, run_path

    run_dir = run_path(cfg)
    if args.fresh:
        remove_run_dir(run_dir)  # only a run directory, never one in use, a link or a parent
    resume = "auto" if (run_dir / "metrics.jsonl").exists() else None
    if resume:
        log.info("%s exists: resuming it (pass --fresh to start over)", run_dir)
    run_dir = _train(cfg, resume, write_html=True)
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    from lmforge.eval.suite import format_interval

    print(f"\nheld-out bits-per-byte ({final.get('interval_level', 0.95):.0%} interval): "
          + ", ".join(f"{k} {v:.3f} [{format_interval(final, k)}]" for k, v in final["bpb"].items()))
    for sample in final["samples"]:
        print(f"\n--- {sample['prompt']!r}\n{sample['prompt']}{sample['text']}")
    print(f"\nopen {run_dir / 'report.html'}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from lmforge.eval.suite import complete_evaluation, describe, heldout_record
    from lmforge.serve.loading import load_for_inference
    from lmforge.core.run_marker import resolve_data_dir
    from lmforge.train.config import RunConfig

    if args.lm_eval_include and not Path(args.lm_eval_include).is_dir():
        # checked before the held-out evaluation is computed and written
        raise ConfigError(f"--lm-eval-include {args.lm_eval_include}: not a folder of task YAML files")
    if args.lm_eval_tasks and args.weights != "raw":
        raise ConfigError(f"--lm-eval-tasks runs on the raw weights; export the {args.weights} weights "
                          f"(lmforge export --weights {args.weights}) and give the harness that folder")
    device = resolve_device(args.device)
    model, tokenizer, raw, checkpoint = load_for_inference(args.target, device, args.weights, args.seq_len)
    cfg = RunConfig.from_dict(raw)
    _long_context_settings(cfg.eval, args)
    seq_len = args.seq_len or cfg.train.seq_len
    data_dir = resolve_data_dir(checkpoint, cfg.data.out_dir)  # relative to where the run trained
    result = heldout_record(model, data_dir, seq_len, cfg.eval, device, max_tokens=args.max_tokens)
    complete_evaluation(result, model, tokenizer, data_dir, cfg.eval)
    if cfg.model.family == "multimodal":  # caption loss and accuracy on the held-out images
        from lmforge.eval.multimodal import evaluate_run_multimodal

        result["multimodal"] = evaluate_run_multimodal(model, cfg.model, data_dir, tokenizer, device)  # type: ignore[arg-type]
    result["checkpoint"] = str(checkpoint)
    result["train_seq_len"] = cfg.train.seq_len
    eval_dir = checkpoint.parent.parent / "eval"
    if args.weights != "raw":  # eval/ema/step_N.json beside eval/step_N.json
        result["weights"] = args.weights
        eval_dir = eval_dir / args.weights
    stem = checkpoint.name if seq_len == cfg.train.seq_len else f"{checkpoint.name}.seq{seq_len}"
    out = eval_dir / f"{stem}.json"
    atomic_write_json(out, result)
    print("\n".join(describe(result)))
    print(f"written: {out}")
    if result.get("passkey"):
        from lmforge.report.plots import write_passkey_png

        print(f"written: {write_passkey_png(result['passkey'], eval_dir / f'{stem}.passkey.png')}")
    if args.lm_eval_tasks:
        from lmforge.serve.lm_eval_adapter import run_lm_eval

        scores = run_lm_eval(checkpoint, args.lm_eval_tasks, args.lm_eval_include, args.limit, str(device))
        harness_out = checkpoint.parent.parent / "eval" / f"{checkpoint.name}.lm_eval.json"
        atomic_write_json(harness_out, scores)
        for task, metrics in scores.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"lm-eval {task}: {shown}")
        print(f"written: {harness_out}")
    return 0


def _long_context_settings(cfg, args: argparse.Namespace) -> None:
    """Apply ``lmforge eval``'s long-context options to the run's eval config (in place)."""
    import dataclasses

    from lmforge.eval.config import PasskeyConfig

    if args.position_bucket:
        cfg.position_bucket = args.position_bucket
    elif args.by_position and not cfg.position_bucket:
        cfg.position_bucket = 64
    options = {"--passkey-lengths": args.passkey_lengths, "--passkey-items": args.passkey_items,
               "--passkey-filler": args.passkey_filler}
    given = [name for name, value in options.items() if value is not None]
    if given and not args.passkey:
        raise ConfigError(f"{', '.join(given)}: set only with --passkey")
    if not args.passkey:
        return
    passkey = cfg.passkey or PasskeyConfig()
    changes = {key: value for key, value in (("lengths", args.passkey_lengths), ("items", args.passkey_items),
                                             ("filler", args.passkey_filler)) if value is not None}
    try:
        cfg.passkey = dataclasses.replace(passkey, **changes)
    except ValueError as exc:
        raise ConfigError(f"--passkey options: {exc}") from None


def generate(args: argparse.Namespace) -> int:
    import torch

    from lmforge.nn.generation import generate as sample
    from lmforge.serve.loading import load_for_inference

    device = resolve_device(args.device)
    model, tokenizer, config, checkpoint = load_for_inference(args.target, device, args.weights)
    if getattr(args, "image", None) or getattr(args, "image_out", None):
        return _generate_multimodal(args, model, tokenizer, config, checkpoint, device)
    if args.prompt is None:
        raise ConfigError("--prompt is required (or --image / --image-out for a multimodal model)")
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ConfigError("--prompt is empty: give some text to continue")
    prompt_ids = torch.tensor([prompt], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = sample(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, eos_id=tokenizer.eos_id, generator=generator)
    print(args.prompt + tokenizer.decode(out[0, prompt_ids.shape[1]:].tolist()))
    return 0


def _generate_multimodal(args: argparse.Namespace, model, tokenizer, config, checkpoint, device) -> int:
    """--image: text after the image (and the prompt); --image-out: an image after the prompt, as PNG."""
    import torch

    from lmforge.nn.generation import generate as sample
    from lmforge.serve.multimodal import (continue_after_image, generate_image, image_prompt_ids, load_image_tokenizer,
                                          model_route, patch_image_prompt, require_image_output, save_png)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    if model_route(config) != "discrete":  # continuous / encoder routes: patches in, text out
        if args.image_out:
            require_image_output(config)
        ids, images = patch_image_prompt(args.image, config, tokenizer)
        prompt = args.prompt or ""
        prompt_ids = torch.tensor([ids + tokenizer.encode(prompt)], dtype=torch.long, device=device)
        out = continue_after_image(model, prompt_ids, images.to(device), args.max_new_tokens, args.temperature,
                                   args.top_k or None, tokenizer.eos_id, generator)
        print(prompt + tokenizer.decode(out[0].tolist()))
        return 0
    image_tokenizer, layout = load_image_tokenizer(checkpoint, config)
    if args.image_out:
        if args.image:
            raise ConfigError("--image and --image-out: give one (caption an image, or draw one)")
        image = generate_image(model, tokenizer, image_tokenizer, layout, args.prompt or "", args.temperature,
                               args.top_k or None, generator)[0]
        print(f"image: {save_png(image, args.image_out, args.image_scale)}")
        return 0
    ids = image_prompt_ids(args.image, config, tokenizer, image_tokenizer, layout)
    prompt = args.prompt or ""
    prompt_ids = torch.tensor([ids + tokenizer.encode(prompt)], dtype=torch.long, device=device)
    out = sample(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, eos_id=tokenizer.eos_id, generator=generator)
    print(prompt + tokenizer.decode(out[0, prompt_ids.shape[1]:].tolist()))
    return 0


def report(args: argparse.Namespace) -> int:
    from lmforge.report import write_report

    print(f"report: {write_report(Path(args.run))}")
    return 0


def export(args: argparse.Namespace) -> int:
    import torch

    from lmforge.export.hf import export_hf
    from lmforge.nn.families import model_config_from_dict
    from lmforge.serve.loading import load_for_inference

    model, _, config, checkpoint = load_for_inference(args.target, torch.device("cpu"), args.weights)
    cfg = model_config_from_dict(config["model"])
    summary = export_hf(model, cfg, checkpoint / "tokenizer.json", Path(args.out), overwrite=args.overwrite)
    shown = checkpoint if args.weights == "raw" else f"the {args.weights} weights of {checkpoint}"
    print(f"exported {shown} as {summary['architecture']} ({summary['parameters']:,} parameters) "
          f"to {summary['out_dir']}; reloaded logits match lmforge's within {summary['max_logit_difference']:.2g}")
    return 0


def mixture_sweep(args: argparse.Namespace) -> int:
    from lmforge.scaling.mixtures import read_sweep, run_sweep

    out = run_sweep(str(find_config(args.config)), args.mixture, args.overrides, args.out)
    rows = read_sweep(out / "sweep.csv")
    columns = [c for c in rows[0] if c.startswith(("bpb_", "epochs_"))] if rows else []
    print(f"{'mixture':<28}" + "".join(f"{c:>20}" for c in columns))
    for row in rows:
        print(f"{row['mixture']:<28}" + "".join(f"{float(row[c]):>20.4f}" if row[c] else f"{'':>20}"
                                               for c in columns))
    print(f"written: {out / 'sweep.csv'}, {out / 'sweep.png'}")
    return 0


def continual(args: argparse.Namespace) -> int:
    from lmforge.continual.experiment import run_continual

    out = run_continual(str(find_config(args.config)), args.overrides, args.out)
    print((out / "continual.md").read_text(), end="")
    print(f"written: {out / 'continual.csv'}, {out / 'continual.md'}, {out / 'continual.png'}")
    return 0


def continual_knowledge(args: argparse.Namespace) -> int:
    from lmforge.continual.knowledge import run_knowledge

    out = run_knowledge(str(find_config(args.config)), args.overrides, args.out)
    print((out / "knowledge.md").read_text(), end="")
    print(f"written: {out / 'knowledge.json'}, {out / 'knowledge.md'}")
    return 0
