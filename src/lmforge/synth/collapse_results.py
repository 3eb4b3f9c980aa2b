"""The model-collapse experiment's table (Markdown) and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.core.io import atomic_write, atomic_write_text


def series(results: dict[str, Any], mode: str, key: str) -> tuple[list[int], list[float]]:
    """(generations, values) of one mode, generation 0 included."""
    rows = [results["generation0"]] + [r for r in results["generations"] if r["mode"] == mode]
    return [r["generation"] for r in rows], [r[key] for r in rows]


def markdown_table(results: dict[str, Any]) -> str:
    zero = results["generation0"]
    rare = results["rare_tokens"]
    lines = [f"Rare set: the rarest {100 * rare['fraction']:.0f}% of the {rare['types_seen_in_real_train']} token "
             f"types seen in the real training split ({rare['types']} types, "
             f"{100 * rare['real_train_share']:.3f}% of its tokens).", "",
             "| mode | generation | held-out real bpb [95% interval] | vs gen 0 | rare-token mass (model) "
             "| vs gen 0 | rare share in the samples it trained on | synthetic docs removed by the pipeline |",
             "|---|---:|---|---:|---:|---:|---:|---|",
             f"| real | 0 | {zero['bpb']:.4f} [{zero['bpb_interval'][0]:.4f}, {zero['bpb_interval'][1]:.4f}] | - "
             f"| {100 * zero['rare_mass']:.4f}% | - | - | - |"]
    for r in results["generations"]:
        removed = "; ".join(f"{name}: {', '.join(f'{v} {k}' for k, v in info['removed'].items()) or 'none'} "
                            f"of {info['read']}" for name, info in r["data_pipeline"].items())
        lines.append(
            f"| {r['mode']} | {r['generation']} | {r['bpb']:.4f} [{r['bpb_interval'][0]:.4f}, "
            f"{r['bpb_interval'][1]:.4f}] | {100 * (r['bpb'] / zero['bpb'] - 1):+.1f}% "
            f"| {100 * r['rare_mass']:.4f}% | {100 * (r['rare_mass'] / zero['rare_mass'] - 1):+.1f}% "
            f"| {100 * r['parent_samples']['rare_share']:.4f}% | {removed} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict[str, Any]) -> None:
    atomic_write_text(out / "collapse.md", markdown_table(results))
    plot(out / "collapse.png", results)


def plot(path: Path, results: dict[str, Any]) -> None:
    """Left: held-out real bpb by generation; right: the models' rare-token mass, with the real
    data's share of rare tokens dashed. One line per mode, from the shared generation 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in results["generations"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for mode in modes:
        for ax, key, scale in ((axes[0], "bpb", 1.0), (axes[1], "rare_mass", 100.0)):
            generations, values = series(results, mode, key)
            ax.plot(generations, [scale * v for v in values], marker="o", label=mode)
    axes[1].axhline(100 * results["rare_tokens"]["real_train_share"], linestyle="--", color="grey",
                    label="real training data")
    axes[0].set_ylabel("held-out real bits per byte")
    axes[1].set_ylabel(f"model mass on rarest {100 * results['rare_tokens']['fraction']:.0f}% of tokens (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("generation")
        ax.legend(fontsize=8)
    axes[0].set_title("held-out real bpb", fontsize=9)
    axes[1].set_title("rare-token probability mass", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
