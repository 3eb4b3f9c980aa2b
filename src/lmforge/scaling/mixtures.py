"""Mixture sweep: several source mixtures → one short training run each → held-out
bits-per-byte per domain, as a table (``sweep.csv``) and a plot (``sweep.png``).

    lmforge mixture-sweep configs/quickstart.yaml --mixture literature=1,code=1 \\
        --mixture literature=3,code=1 --mixture literature=1,code=3 --set train.steps=200

Each run is the base config with its sources' ``weight`` replaced (data preparation is
shared: weights are not part of the prepared data's fingerprint) and the run named
``<name>_mix<k>``; a finished run (``eval/final.json`` present) is not trained again. The
table also shows the planned epochs per source, so a mixture that repeats a small source
too often shows up next to its score.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

from lmforge.core.config import apply_overrides, read_yaml
from lmforge.core.errors import ConfigError
from lmforge.core.io import atomic_write, atomic_write_text


def parse_mixture(text: str) -> dict[str, float]:
    """``"literature=3,code=1"`` → ``{"literature": 3.0, "code": 1.0}``."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name or weight < 0:
            raise ConfigError(f"--mixture {text!r}: expected source=weight pairs like literature=3,code=1")
        out[name.strip()] = weight
    if not out or not any(out.values()):
        raise ConfigError(f"--mixture {text!r}: at least one source needs a weight > 0")
    return out


def mixture_configs(base: dict[str, Any], mixtures: list[dict[str, float]]) -> list[dict[str, Any]]:
    sources = [s["name"] for s in base.get("data", {}).get("sources", [])]
    configs = []
    for k, mixture in enumerate(mixtures):
        unknown = sorted(set(mixture) - set(sources))
        if unknown:
            raise ConfigError(f"mixture {k}: unknown sources {unknown} (the config has {sources})")
        cfg = copy.deepcopy(base)
        for source in cfg["data"]["sources"]:
            source["weight"] = mixture.get(source["name"], 0.0)
        cfg["name"] = f"{base.get('name', 'run')}_mix{k}"
        configs.append(cfg)
    return configs


def run_sweep(config_path: str, mixtures: list[str], overrides: list[str], out_dir: str | None = None) -> Path:
    from lmforge.data.mixture import planned_epochs
    from lmforge.train.config import RunConfig
    from lmforge.train.assembly import build_trainer

    base = apply_overrides(read_yaml(config_path), overrides)
    parsed = [parse_mixture(m) for m in mixtures]
    rows = []
    for mixture, raw in zip(parsed, mixture_configs(base, parsed)):
        cfg = RunConfig.from_dict(raw)
        run_dir = Path(cfg.runs_dir) / cfg.name
        final = run_dir / "eval" / "final.json"
        if not final.is_file():
            trainer = build_trainer(cfg, resume="auto" if (run_dir / "metrics.jsonl").exists() else None)
            epochs = planned_epochs(trainer.batches.source_tokens(), trainer.batches.weights(),
                                    cfg.train.tokens_per_step * cfg.train.steps)
            trainer.fit()  # releases the run's lock however it ends
        else:
            epochs = {}
        result = json.loads(final.read_text())
        row: dict[str, Any] = {"run": cfg.name, "mixture": ",".join(f"{k}={v:g}" for k, v in mixture.items())}
        row.update({f"bpb_{d}": v for d, v in result["bpb"].items()})
        row["bpb_mean"] = sum(result["bpb"].values()) / len(result["bpb"])
        row.update({f"epochs_{s}": round(e, 3) for s, e in epochs.items()})
        rows.append(row)
    out = Path(out_dir or Path(base.get("runs_dir", "runs")) / f"{base.get('name', 'run')}_mixture_sweep")
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep.csv", text.getvalue())
    _plot(rows, out / "sweep.png")
    return out


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({k[4:] for row in rows for k in row if k.startswith("bpb_") and k != "bpb_mean"})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 3.5))
    width = 0.8 / max(len(domains), 1)
    for j, domain in enumerate(domains):
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(xs, [row.get(f"bpb_{domain}", 0) for row in rows], width, label=domain)
    ax.set_xticks([i + width * (len(domains) - 1) / 2 for i in range(len(rows))])
    ax.set_xticklabels([row["mixture"] for row in rows], rotation=15, fontsize=8)
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("mixture sweep")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def read_sweep(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
