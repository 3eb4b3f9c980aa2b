"""The model-collapse experiment's equal-compute control: the generation-0 model trained on the
real data alone for a given number of steps, scored exactly as the experiment scores every
generation (held-out real bits-per-byte and rare-token mass, ``synth.collapse._measure``).

    python bench/collapse_real_control.py configs/synth_collapse.yaml 600 1800 \\
        --set runs_dir=/tmp/h16/runs --set data.out_dir=/tmp/h16/data/real [--out control.json]

A run per step count, named ``<name>_real_only_<steps>`` in the config's runs_dir (reused when it
finished earlier). Compares with ``accumulate_growing`` generation g, which trains (g+1) x steps.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from lmforge.core.config import apply_overrides, read_yaml
from lmforge.synth.collapse import CollapseConfig, _measure
from lmforge.synth.collapse_metrics import rare_tokens
from lmforge.train.assembly import train_or_reuse
from lmforge.train.config import RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("steps", type=int, nargs="+")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep-global-heldout", action="store_true",
                        help="drop per-source heldout_fraction (data prepared before sources set their own)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    raw = apply_overrides(read_yaml(args.config), args.overrides)
    cfg = CollapseConfig.from_dict(raw.pop("collapse"), path="collapse")
    if args.keep_global_heldout:
        for source in raw["data"]["sources"]:
            source.pop("heldout_fraction", None)
    real_dir = Path(raw["data"]["out_dir"])
    rare = rare_tokens(real_dir, cfg.real_source, cfg.rare_fraction)
    results = {}
    for steps in args.steps:
        run = copy.deepcopy(raw)
        run["name"] = f"{raw.get('name', 'collapse')}_real_only_{steps}"
        run.setdefault("train", {})["steps"] = steps
        run_dir = train_or_reuse(RunConfig.from_dict(run), "real-only control")
        results[steps] = _measure(run_dir, real_dir, cfg, rare, int(run["train"].get("seq_len", 128)))
        print(steps, json.dumps(results[steps]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
