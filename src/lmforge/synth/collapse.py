"""The model-collapse experiment in one command: ``lmforge synth-collapse CONFIG``.

CONFIG is a run config (real data, model, optimizer, training, evaluation) plus a
``collapse:`` section. Generation 0 trains on the real data. Then, for each mode and each
generation g = 1..N:

- the model of generation g-1 samples ``samples.documents`` documents, unconditionally
  (``lmforge synth``, with provenance; generation 0's samples are shared by both modes);
- a data directory is prepared with the real sources and the synthetic ones (the same quality
  filters, exact and near dedup against each other and the real data, decontamination against
  every eval set and the real held-out split; the real data's tokenizer):
  *replace* (Shumailov et al. 2024): only generation g-1's samples are trained on (the real
  sources stay in the directory with weight 0, for their held-out split);
  *accumulate* (Gerstgrasser et al. 2024): the real data and every generation's samples so far,
  each data set with the same weight;
  *accumulate_growing*: the same data, trained for (g+1) times generation 0's steps, so every
  generation sees as much real text as generation 0 (Gerstgrasser et al. train on the whole
  growing data set; with a fixed step budget, *accumulate* trains on ever less real text);
- generation g trains from scratch with the same steps as generation 0 (``accumulate_growing``:
  (g+1) times as many) through the run assembly every command uses.

Every model is then scored on the *real* held-out split (bits-per-byte) and on the probability
mass it gives the rarest tokens (synth/collapse_metrics.py). Results: ``collapse.json``,
``collapse.md`` and ``collapse.png`` in ``runs/<name>_collapse/``. Finished runs, samples and
data directories are reused, so the command can be rerun after a crash.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.core.config import Config, FieldValueError, apply_overrides, read_yaml
from lmforge.core.errors import ConfigError
from lmforge.core.io import atomic_write_json
from lmforge.core.logging import get_logger
from lmforge.train.config import TrainConfig

log = get_logger(__name__)
MODES = ("replace", "accumulate", "accumulate_growing")


@dataclass
class CollapseSamplesConfig(Config):
    documents: int = 400             # sampled documents per generation
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    docs_per_shard: int = 100


@dataclass
class CollapseConfig(Config):
    generations: int = 5             # trained generations after generation 0
    modes: list[str] = field(default_factory=lambda: ["replace", "accumulate"])  # any of MODES
    real_source: str = "literature"  # the real source whose held-out bpb and rare tokens are measured
    samples: CollapseSamplesConfig = field(default_factory=CollapseSamplesConfig)
    synthetic_heldout_fraction: float = 0.02   # held-out share of each synthetic source (its own domain)
    rare_fraction: float = 0.1       # the rarest share of the real token types
    eval_tokens: int = 32768         # held-out real tokens scored per model

    def __post_init__(self) -> None:
        if self.generations < 1:
            raise FieldValueError("generations", f"must be >= 1, got {self.generations}")
        unknown = [m for m in self.modes if m not in MODES]
        if not self.modes or unknown:
            raise FieldValueError("modes", f"choose from {', '.join(MODES)}, got {self.modes}")
        if not 0.0 < self.synthetic_heldout_fraction < 1.0:
            raise FieldValueError("synthetic_heldout_fraction", f"must be in (0, 1), got {self.synthetic_heldout_fraction}")
        if not 0.0 < self.rare_fraction <= 1.0:
            raise FieldValueError("rare_fraction", f"must be in (0, 1], got {self.rare_fraction}")


@dataclass
class Generation:
    mode: str                        # "real" for generation 0, else one of MODES
    index: int
    run: dict[str, Any]              # the full run config
    samples_from: list[str] = field(default_factory=list)   # synth folders it trains on


def _runs_dir(base: dict[str, Any]) -> Path:
    return Path(base.get("runs_dir", "runs"))


def _samples_dir(out: Path, mode: str, index: int) -> Path:
    """Where the samples of generation ``index``'s model go (generation 0's are shared)."""
    return out / "samples" / ("gen0" if index == 0 else f"{mode}_gen{index}")


def plan_generations(base: dict[str, Any], cfg: CollapseConfig, out: Path) -> list[Generation]:
    name = base.get("name", "collapse")
    sources = base.get("data", {}).get("sources", [])
    names = [s.get("name") for s in sources]
    if cfg.real_source not in names:
        raise ConfigError(f"collapse.real_source: {cfg.real_source!r} is not a source of the config's data "
                          f"(sources: {names})")
    if not base.get("data", {}).get("out_dir"):
        raise ConfigError("data.out_dir: the collapse experiment needs the real data's directory named")
    real_dir = base["data"]["out_dir"]
    zero = copy.deepcopy(base)
    zero["name"] = f"{name}_gen0"
    plans = [Generation("real", 0, zero)]
    real_weight = sum(float(s.get("weight", 1.0)) for s in sources)
    for mode in cfg.modes:
        for index in range(1, cfg.generations + 1):
            run = copy.deepcopy(base)
            run["name"] = f"{name}_{mode}_gen{index}"
            accumulating = mode.startswith("accumulate")
            kept = range(index) if accumulating else [index - 1]
            if mode == "accumulate_growing":
                train = run.setdefault("train", {})
                train["steps"] = (index + 1) * int(train.get("steps", TrainConfig().steps))
            folders = [str(_samples_dir(out, mode, j)) for j in kept]
            real = copy.deepcopy(sources)
            if mode == "replace":
                for source in real:
                    source["weight"] = 0.0   # kept for its held-out split only
            synthetic = [{"name": f"synthetic_gen{j}", "kind": "synthetic", "path": folder,
                          "weight": real_weight if accumulating else 1.0,
                          "heldout_fraction": cfg.synthetic_heldout_fraction}
                         for j, folder in zip(kept, folders)]
            run["data"] = {**copy.deepcopy(base["data"]), "sources": real + synthetic, "tokenizer_from": real_dir,
                           "out_dir": str(out / "data" / f"{mode}_gen{index}")}
            plans.append(Generation(mode, index, run, folders))
    return plans


def _train(plan: Generation) -> Path:
    from lmforge.train.assembly import train_or_reuse
    from lmforge.train.config import RunConfig

    return train_or_reuse(RunConfig.from_dict(plan.run), f"collapse experiment: {plan.mode} generation {plan.index}")


def _sample(run_dir: Path, folder: Path, cfg: CollapseConfig, seed: int) -> dict:
    from lmforge.synth.config import SynthConfig
    from lmforge.synth.run import generate_synthetic

    s = cfg.samples
    synth = SynthConfig.from_dict({
        "out_dir": str(folder), "teacher": {"kind": "lmforge", "path": str(run_dir)}, "mode": "unconditional",
        "documents": s.documents, "batch_size": s.batch_size, "docs_per_shard": s.docs_per_shard,
        "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                     "max_new_tokens": s.max_new_tokens, "seed": seed}}, path="collapse.samples")
    return generate_synthetic(synth)


def _texts(folder: Path) -> list[str]:
    from lmforge.data.sources import synthetic_shards

    return [json.loads(line)["text"] for shard, _ in synthetic_shards(folder)
            for line in shard.read_text(encoding="utf-8").splitlines()]


def _measure(run_dir: Path, real_dir: Path, cfg: CollapseConfig, rare: Any, seq_len: int) -> dict:
    from lmforge.nn.loading import load_model
    from lmforge.synth.collapse_metrics import heldout_real_bpb, model_rare_mass

    model, _, _ = load_model(run_dir, "cpu")
    return {**heldout_real_bpb(model, real_dir, cfg.real_source, seq_len, cfg.eval_tokens),
            "rare_mass": model_rare_mass(model, real_dir, cfg.real_source, rare, seq_len, cfg.eval_tokens)}


def _pipeline_removals(data_dir: Path) -> dict[str, dict]:
    """Per synthetic source: documents read, removed by each step, kept for training."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    out = {}
    for name, fields in manifest["pipeline"].items():
        if manifest["data_origin"]["by_source"][name]["origin"] != "synthetic":
            continue
        removed = {k.removeprefix("removed_"): (sum(v.values()) if isinstance(v, dict) else v)
                   for k, v in fields.items() if k.startswith("removed_")}
        out[name] = {"read": fields["read"], "removed": {k: v for k, v in removed.items() if v},
                     "train_documents": fields["train_docs"]}
    return out


def run_collapse(config_path: str, overrides: list[str], out_dir: str | None = None) -> Path:
    """Train, sample and measure every generation (reusing finished work); write the results."""
    from lmforge.data.tokenizer import Tokenizer
    from lmforge.synth.collapse_metrics import rare_tokens, sample_rare_share
    from lmforge.synth.collapse_results import write_results

    raw = apply_overrides(read_yaml(config_path), overrides)
    if "collapse" not in raw:
        raise ConfigError(f"{config_path}: no collapse: section (see configs/synth_collapse.yaml)")
    cfg = CollapseConfig.from_dict(raw.pop("collapse"), path="collapse")
    out = Path(out_dir or _runs_dir(raw) / f"{raw.get('name', 'collapse')}_collapse")
    plans = plan_generations(raw, cfg, out)
    real_dir = Path(raw["data"]["out_dir"])
    seq_len = int(raw.get("train", {}).get("seq_len", 128))
    run_dirs: dict[tuple[str, int], Path] = {("real", 0): _train(plans[0])}
    rare = rare_tokens(real_dir, cfg.real_source, cfg.rare_fraction)
    tokenizer = Tokenizer.load(real_dir / "tokenizer.json")
    rows: list[dict[str, Any]] = []
    zero = {"mode": "real", "generation": 0, "run": str(run_dirs[("real", 0)]),
            **_measure(run_dirs[("real", 0)], real_dir, cfg, rare, seq_len)}
    for plan in plans[1:]:
        parent = run_dirs[("real", 0)] if plan.index == 1 else run_dirs[(plan.mode, plan.index - 1)]
        folder = _samples_dir(out, plan.mode, plan.index - 1)
        summary = _sample(parent, folder, cfg, seed=plan.index - 1)
        share, tokens = sample_rare_share(_texts(folder), tokenizer, rare)
        run_dirs[(plan.mode, plan.index)] = run_dir = _train(plan)
        rows.append({"mode": plan.mode, "generation": plan.index, "run": str(run_dir),
                     **_measure(run_dir, real_dir, cfg, rare, seq_len),
                     "trained_on_samples_of": [str(f) for f in plan.samples_from],
                     "parent_samples": {"folder": str(folder), "documents": summary["documents"],
                                        "generated_tokens": summary["generated_tokens"],
                                        "rare_share": share, "tokens_real_tokenizer": tokens},
                     "data_pipeline": _pipeline_removals(Path(plan.run["data"]["out_dir"]))})
    results = {"config": {**cfg.to_dict(), "base": raw}, "rare_tokens": {
        "fraction": cfg.rare_fraction, "types": int(len(rare.ids)), "types_seen_in_real_train": rare.types_seen,
        "real_train_share": rare.real_share}, "generation0": zero, "generations": rows}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "collapse.json", results)
    write_results(out, results)
    return out
