"""``lmforge synth CONFIG`` and ``lmforge synth-collapse CONFIG``: parsing and printing only;
the work is in lmforge/synth/."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmforge.cli.arguments import add_config_args


def add_synth_parsers(verbs: Any) -> None:
    synth = verbs.add_parser("synth", help="generate synthetic documents from a teacher model, with provenance",
                             description="Generate documents from a teacher (an lmforge run/checkpoint, or a "
                                         "Hugging Face causal LM by name or folder): continuations of real "
                                         "document prefixes, rephrasings, or unconditional samples (CONFIG: a "
                                         "synth config, or a file with a synth: section). Resumable: finished "
                                         "shards are kept. Read the output as a data source with kind: synthetic. "
                                         "See docs/data_limited.md.")
    add_config_args(synth)
    synth.add_argument("--overwrite", action="store_true",
                       help="replace documents in out_dir generated with a different config or teacher")
    collapse = verbs.add_parser("synth-collapse", help="model collapse: train -> sample -> retrain, replace vs accumulate",
                                description="Generations 0..N of train -> sample -> retrain, in replace mode (each "
                                            "generation trains on the previous one's samples only) and accumulate "
                                            "mode (real data plus every generation's samples); held-out real "
                                            "bits-per-byte and the probability mass of the rarest tokens per "
                                            "generation (CONFIG: a run config with a collapse: section). Writes "
                                            "collapse.json/.md/.png. Finished steps are reused.")
    add_config_args(collapse)
    collapse.add_argument("--out", default=None, help="output folder (default runs/<name>_collapse)")


def synth(args: argparse.Namespace) -> int:
    from lmforge.cli.commands import find_config
    from lmforge.core.config import apply_overrides, read_yaml
    from lmforge.synth.config import SynthConfig
    from lmforge.synth.run import generate_synthetic

    raw = apply_overrides(read_yaml(find_config(args.config)), args.overrides)
    section = raw["synth"] if "synth" in raw else raw
    cfg = SynthConfig.from_dict(section, path="synth" if "synth" in raw else "")
    summary = generate_synthetic(cfg, overwrite=args.overwrite)
    print(json.dumps({k: summary[k] for k in ("documents", "generated_tokens", "dropped", "shards",
                                              "skipped_finished_shards", "tokens_per_second_this_run")}))
    print(f"written: {cfg.out_dir} (read it as a data source: kind: synthetic, path: {cfg.out_dir})")
    return 0


def synth_collapse(args: argparse.Namespace) -> int:
    from lmforge.cli.commands import find_config
    from lmforge.synth.collapse import run_collapse

    out = run_collapse(str(find_config(args.config)), args.overrides, args.out)
    print((out / "collapse.md").read_text(), end="")
    print(f"written: {out / 'collapse.json'}, {out / 'collapse.md'}, {out / 'collapse.png'}")
    return 0
