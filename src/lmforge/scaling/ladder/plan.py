"""Expand a ladder config into rungs and write every rung's resolved run config.

**N.** Parameters are counted with ``lmforge.nn.counting`` on the exact model config
(vocabulary = the prepared tokenizer's). N_active counts the embedding once (tied) plus
every parameter a token passes through (a MoE's shared weights and top-k experts). With
tied embeddings this is exactly the set of weights the 6·N FLOPs per token count — the
output head *is* the embedding matrix. Budgets and C use N_active: **C = 6·N_active·D**.
The ``count`` setting only changes which count the fits use (the ``N`` column).

**D.** Each rung trains ``steps = round(D_target / tokens_per_step)`` optimizer steps;
its D is ``steps · batch · seq_len`` (what was trained), not the target.

**WSD chains.** Under ``schedule.kind: wsd`` the rungs of one model size are sorted by
length. The first trains from scratch; rung i resumes rung i−1's checkpoint at rung i−1's
decay start S_{i−1} (still in the constant-LR phase, so identical to a run of rung i's
length up to there) and trains on to its own length T_i, decaying over its last
``decay_fraction``. Each rung saves a checkpoint at its own S_i for the next one. The
decay start is found from ``optim.schedules.lr_multiplier`` itself (bisection), so the
chain and the trainer cannot disagree. With ``checkpoint_every`` > 0 the S_i are rounded
to multiples of it (T_i follows), so periodic checkpoints land on the branch points.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.core.errors import ConfigError
from lmforge.core.io import atomic_write_json, atomic_write_text
from lmforge.nn.config import ModelConfig
from lmforge.nn.counting import ParameterCounts, count_parameters
from lmforge.optim.config import OptimConfig
from lmforge.optim.schedules import lr_multiplier
from lmforge.scaling.ladder.config import LadderConfig
from lmforge.train.config import RunConfig

PLAN_FILE = "ladder_plan.json"


@dataclass
class Rung:
    """One training run of the ladder."""

    name: str
    size: int                      # index of the model size (order of the size rule)
    d_model: int
    n_layers: int
    target_tokens: float           # D asked for; ``tokens`` is what `steps` trains
    steps: int
    batch_size: int                # global sequences per step
    seq_len: int
    lr: float
    warmup_steps: int
    schedule: str
    counts: ParameterCounts
    budget: float | None = None    # IsoFLOP budget C this rung belongs to
    decay_start: int | None = None # WSD: first step of the decay
    parent: str | None = None      # WSD: rung whose checkpoint this one resumes ...
    branch_step: int | None = None # ... at this step
    holdout: bool = False
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    min_lr_ratio: float = 0.1
    decay_fraction: float | None = None
    unique_tokens: int | None = None  # epochs sweep: the unique-token budget (data.unique_tokens) it trains on
    repetitions: float | None = None   # epochs sweep: D / U of its repeated arm (R·U tokens, repeated or fresh)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def n_active_non_embedding(self) -> int:
        return self.counts.active - self.counts.embedding - self.counts.lm_head

    @property
    def compute(self) -> float:
        """C = 6 · N_active · D."""
        return 6.0 * self.counts.active * self.tokens

    @property
    def own_compute(self) -> float:
        """6·N_active·(tokens this rung trains itself): a WSD branch starts at its branch step."""
        return 6.0 * self.counts.active * (self.steps - (self.branch_step or 0)) * self.tokens_per_step

    def params(self, count: str) -> int:
        return self.n_active_non_embedding if count == "active_non_embedding" else self.counts.active

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["counts"] = asdict(self.counts)
        out.update(tokens=self.tokens, compute=self.compute, tokens_per_step=self.tokens_per_step,
                   n_active_non_embedding=self.n_active_non_embedding)
        return out


@dataclass
class LadderPlan:
    cfg: LadderConfig
    base: dict[str, Any]
    vocab_size: int
    rungs: list[Rung]
    run_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ladder_dir(self) -> Path:
        return self.cfg.ladder_dir

    @property
    def runs_dir(self) -> Path:
        return self.ladder_dir / "runs"

    @property
    def configs_dir(self) -> Path:
        return self.ladder_dir / "configs"

    def config_path(self, rung: Rung | str) -> Path:
        return self.configs_dir / f"{rung if isinstance(rung, str) else rung.name}.yaml"

    def rung(self, name: str) -> Rung:
        for rung in self.rungs:
            if rung.name == name:
                return rung
        raise ConfigError(f"no rung named {name!r} in ladder {self.cfg.name} "
                          f"(rungs: {', '.join(r.name for r in self.rungs)})")

    def chains(self) -> list[list[Rung]]:
        """Rungs grouped so that each rung follows its parent (WSD); cosine rungs stand alone."""
        children: dict[str | None, list[Rung]] = {}
        for rung in self.rungs:
            children.setdefault(rung.parent, []).append(rung)
        chains = []
        for root in children.get(None, []):
            chain, node = [root], root
            while children.get(node.name):
                node = children[node.name][0]
                chain.append(node)
            chains.append(chain)
        return chains


# --------------------------------------------------------------------------- names


def short_number(value: float) -> str:
    """2000000 -> '2M', 1500000 -> '1.5M', 250000 -> '250K'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def short_sci(value: float) -> str:
    """3e15 -> '3e15', 2.5e15 -> '2.5e15'."""
    exponent = math.floor(math.log10(value))
    mantissa = value / 10 ** exponent
    if round(mantissa, 2) >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:.3g}e{exponent}"


# --------------------------------------------------------------------------- sizes


def model_section(cfg: LadderConfig, base_model: dict[str, Any], d_model: int, n_layers: int,
                  vocab_size: int) -> dict[str, Any]:
    """The base model section with this size's shape (the shared size rule applied)."""
    rule = cfg.sizes
    try:
        fields = rule.model_fields(d_model, n_layers)
    except ConfigError as exc:
        raise ConfigError(f"sizes: {exc}") from None
    model = copy.deepcopy(base_model)
    model.update(fields, vocab_size=vocab_size)
    expert = rule.expert_hidden(d_model)
    if model.get("moe") is not None and expert is not None:
        model["moe"] = {**model["moe"], "d_expert": expert}
    return model


# --------------------------------------------------------------------------- WSD arithmetic


def wsd_optim(warmup_steps: int, decay_fraction: float, min_lr_ratio: float) -> OptimConfig:
    return OptimConfig(schedule="wsd", warmup_steps=warmup_steps, decay_fraction=decay_fraction,
                       min_lr_ratio=min_lr_ratio)


def decay_start(total_steps: int, optim: OptimConfig) -> int:
    """First step (0-based) whose WSD multiplier is below the peak, as the trainer computes it."""
    low, high = min(optim.warmup_steps, total_steps - 1), total_steps - 1
    if lr_multiplier(high, total_steps, optim) >= 1.0:
        raise ConfigError(f"schedule: a WSD run of {total_steps} steps never decays (min_lr_ratio must be < 1)")
    while low < high:  # multiplier is 1 on [warmup, S) and < 1 on [S, T)
        mid = (low + high) // 2
        if lr_multiplier(mid, total_steps, optim) < 1.0:
            high = mid
        else:
            low = mid + 1
    return low


def steps_with_decay_start(start: int, near: int, optim: OptimConfig) -> int:
    """The total steps T closest to ``near`` whose decay starts at step ``start``.

    T − decay_steps(T) grows by 0 or 1 as T grows by 1, so the T with a given decay
    start form one contiguous run; we walk to it from an estimate.
    """
    t = max(start + 1, int(start / (1.0 - optim.decay_fraction)) - 2)
    while t > start + 1 and decay_start(t, optim) > start:
        t -= 1
    while decay_start(t, optim) < start:
        t += 1
    matches = []
    while decay_start(t, optim) == start:
        matches.append(t)
        t += 1
    if not matches:
        raise ConfigError(f"schedule: no WSD length decays from step {start}")
    return min(matches, key=lambda m: (abs(m - near), m))


# --------------------------------------------------------------------------- the plan


def epochs_unique_tokens(cfg: LadderConfig, tokens_per_step: int) -> int:
    """The epochs sweep's unique-token budget U, rounded down to whole optimizer steps."""
    assert cfg.epochs is not None
    unique = int(cfg.epochs.unique_tokens) // tokens_per_step * tokens_per_step
    if unique < tokens_per_step:
        raise ConfigError(f"epochs.unique_tokens: {cfg.epochs.unique_tokens:g} is less than one optimizer step "
                          f"({tokens_per_step} tokens)")
    return unique


def epochs_targets(cfg: LadderConfig, tokens_per_step: int) -> list[tuple[int, float, str, int, float]]:
    """(size index, D, rung name, unique tokens, R) of every run of an epochs sweep: for each R,
    U repeated R times (``..._R4_repeat``) and R·U fresh tokens seen once (``..._R4_fresh``);
    R = 1 is the single run ``..._R1``."""
    assert cfg.epochs is not None
    unique = epochs_unique_tokens(cfg, tokens_per_step)
    out = []
    for size, (d_model, n_layers) in enumerate(cfg.sizes.dims()):
        for repeats in sorted(cfg.epochs.repetitions):
            tokens = round(repeats * unique / tokens_per_step) * tokens_per_step
            prefix = f"d{d_model}L{n_layers}_R{repeats:g}"
            if tokens == unique:
                out.append((size, float(tokens), prefix, unique, float(repeats)))
                continue
            out.append((size, float(tokens), f"{prefix}_repeat", unique, float(repeats)))
            if cfg.epochs.fresh:
                out.append((size, float(tokens), f"{prefix}_fresh", tokens, float(repeats)))
    return out


def _targets(cfg: LadderConfig, counts: list[ParameterCounts],
             tokens_per_step: int = 0) -> list[tuple[int, float, float | None, str]]:
    """(size index, target D, budget C or None, rung name) for every rung."""
    dims = cfg.sizes.dims()
    out = []
    if cfg.epochs is not None:
        return [(size, tokens, None, name) for size, tokens, name, _, _ in epochs_targets(cfg, tokens_per_step)]
    if cfg.grid is not None:
        for size, (d_model, n_layers) in enumerate(dims):
            prefix = f"d{d_model}L{n_layers}"
            for tokens in cfg.grid.tokens:
                out.append((size, float(tokens), None, f"{prefix}_D{short_number(float(tokens))}"))
            for ratio in cfg.grid.tokens_per_param:
                out.append((size, ratio * counts[size].active, None, f"{prefix}_tpp{ratio:g}"))
        return out
    assert cfg.isoflop is not None
    rule = cfg.isoflop
    for budget in sorted(float(c) for c in rule.compute):
        kept = 0
        for size, (d_model, n_layers) in enumerate(dims):
            tokens = budget / (6.0 * counts[size].active)
            if rule.min_tokens_per_param <= tokens / counts[size].active <= rule.max_tokens_per_param:
                out.append((size, tokens, budget, f"C{short_sci(budget)}_d{d_model}L{n_layers}"))
                kept += 1
        if kept == 0:
            raise ConfigError(f"isoflop: budget {budget:.3g} has no size with tokens per parameter in "
                              f"[{rule.min_tokens_per_param}, {rule.max_tokens_per_param}]; add sizes or widen the range")
    return out


def _warmup(cfg: LadderConfig, steps: int) -> int:
    rule = cfg.schedule
    if rule.warmup_steps is not None:
        return rule.warmup_steps
    return max(1, round(rule.warmup_fraction * steps)) if rule.warmup_fraction > 0 else 0


def build_plan(cfg: LadderConfig, base: dict[str, Any], vocab_size: int | None = None) -> LadderPlan:
    """Every rung of the ladder and its resolved run config (validated as a RunConfig).

    ``vocab_size``: the prepared tokenizer's (the trainer uses it); default: the base
    config's ``data.vocab_size``, the size the tokenizer is trained to.
    """
    try:
        base_cfg = RunConfig.from_dict(base)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
    vocab_size = vocab_size or base_cfg.data.vocab_size
    base_model = base_cfg.model.to_dict()
    seq_len = base_cfg.train.seq_len
    dims = cfg.sizes.dims()
    if len(set(dims)) != len(dims):
        raise ConfigError(f"sizes: repeated shapes in {dims}")
    models = []
    for d_model, n_layers in dims:
        section = model_section(cfg, base_model, d_model, n_layers, vocab_size)
        try:
            models.append(ModelConfig.from_dict(section, path="model"))
        except ConfigError as exc:
            raise ConfigError(f"sizes: d_model {d_model}, n_layers {n_layers}: {exc}") from None
    counts = [count_parameters(m) for m in models]
    unique: dict[str, tuple[int, float]] = {}
    if cfg.epochs is not None:
        # Every run of the sweep shares one batch, so R epochs of U are exactly R·U tokens.
        if cfg.batch.compute_exponent != 0.0:
            raise ConfigError("batch.compute_exponent: an epochs sweep needs one batch size for every run (0)")
        tokens_per_step = cfg.batch.sequences * seq_len
        unique = {name: (u, r) for _, _, name, u, r in epochs_targets(cfg, tokens_per_step)}
        targets = _targets(cfg, counts, tokens_per_step)
    else:
        targets = _targets(cfg, counts)
    names = [t[3] for t in targets]
    if len(set(names)) != len(names):
        raise ConfigError(f"two rungs would share a name ({sorted(n for n in names if names.count(n) > 1)[0]}): "
                          "token budgets or compute budgets are too close")

    # Held out by --holdout-largest: the largest model (grid) or the largest budget (IsoFLOP).
    if cfg.epochs is not None:  # an epochs sweep has no held-out prediction
        holdout: set[str] = set()
    elif cfg.isoflop is None:
        largest = max(range(len(dims)), key=lambda i: counts[i].active)
        holdout = {t[3] for t in targets if t[0] == largest}
    else:
        top = max(t[2] for t in targets)  # type: ignore[type-var]
        holdout = {t[3] for t in targets if t[2] == top}

    interval = cfg.checkpoint_every if cfg.checkpoint_every is not None else base_cfg.train.checkpoint_every
    rungs: list[Rung] = []
    for size in range(len(dims)):
        mine = sorted((t for t in targets if t[0] == size), key=lambda t: t[1])
        if not mine:
            continue
        common = dict(size=size, d_model=dims[size][0], n_layers=dims[size][1], seq_len=seq_len,
                      lr=cfg.lr.lr(dims[size][0]), counts=counts[size], schedule=cfg.schedule.kind,
                      min_lr_ratio=cfg.schedule.min_lr_ratio, log_every=base_cfg.train.log_every)
        if cfg.schedule.kind == "cosine":
            for _, tokens, budget, name in mine:
                batch = cfg.batch.sequences_for(6.0 * counts[size].active * tokens)
                steps = max(1, round(tokens / (batch * seq_len)))
                u, r = unique.get(name, (None, None))
                rungs.append(Rung(name=name, target_tokens=tokens, steps=steps, batch_size=batch,
                                  warmup_steps=min(_warmup(cfg, steps), steps - 1), budget=budget,
                                  holdout=name in holdout, eval_every=max(1, steps // cfg.evals_per_run),
                                  checkpoint_every=interval, keep_checkpoints=base_cfg.train.keep_checkpoints,
                                  unique_tokens=u, repetitions=r, **common))
        else:
            rungs += _wsd_chain(cfg, mine, common, holdout, interval, base_cfg.train.keep_checkpoints)
    plan = LadderPlan(cfg=cfg, base=base, vocab_size=vocab_size, rungs=rungs)
    plan.run_configs = {rung.name: run_config(plan, rung) for rung in rungs}
    return plan


def _wsd_chain(cfg: LadderConfig, mine: list, common: dict, holdout: set[str], interval: int,
               base_keep: int) -> list[Rung]:
    rule = cfg.schedule
    active = common["counts"].active
    batch = cfg.batch.sequences_for(6.0 * active * mine[-1][1])  # the chain's largest C decides
    tokens_per_step = batch * common["seq_len"]
    wanted = [max(2, round(t[1] / tokens_per_step)) for t in mine]
    warmup = _warmup(cfg, wanted[0])
    optim = wsd_optim(warmup, rule.decay_fraction, rule.min_lr_ratio)
    rungs: list[Rung] = []
    previous: Rung | None = None
    eval_every = max(1, wanted[-1] // cfg.evals_per_run)
    for (_, tokens, budget, name), near in zip(mine, wanted):
        start = decay_start(near, optim)
        if interval > 0:
            start = max(interval, interval * round(start / interval))
        steps = steps_with_decay_start(start, near, optim) if interval > 0 else near
        if start <= warmup:
            raise ConfigError(f"schedule: rung {name} would start its decay at step {start}, within the "
                              f"{warmup}-step warmup; give it more tokens or a shorter warmup")
        if previous is not None and start <= previous.decay_start:  # type: ignore[operator]
            raise ConfigError(f"schedule: rungs {previous.name} and {name} decay from the same step {start}; "
                              "their token budgets are too close for WSD branching at this batch size")
        every = interval if interval > 0 else start
        saves_after_start = steps // every - start // every + 1  # periodic saves after S, plus the final one
        rung = Rung(name=name, target_tokens=tokens, steps=steps, batch_size=batch, warmup_steps=warmup,
                    budget=budget, decay_start=start, holdout=name in holdout, eval_every=eval_every,
                    checkpoint_every=every, keep_checkpoints=max(base_keep, saves_after_start + 1),
                    decay_fraction=rule.decay_fraction,
                    parent=previous.name if previous else None,
                    branch_step=previous.decay_start if previous else None, **common)
        rungs.append(rung)
        previous = rung
    return rungs


def run_config(plan: LadderPlan, rung: Rung) -> dict[str, Any]:
    """The full resolved run config of ``rung`` (the base with the ladder's rules applied)."""
    cfg = plan.cfg
    run = copy.deepcopy(plan.base)
    run["name"] = rung.name
    run["runs_dir"] = str(plan.runs_dir)
    run["model"] = model_section(cfg, run.get("model") or {}, rung.d_model, rung.n_layers, plan.vocab_size)
    optim = dict(run.get("optim") or {})
    optim.update(lr=rung.lr, schedule=rung.schedule, warmup_steps=rung.warmup_steps, min_lr_ratio=rung.min_lr_ratio)
    if rung.decay_fraction is not None:
        optim["decay_fraction"] = rung.decay_fraction
    run["optim"] = optim
    train = dict(run.get("train") or {})
    train.update(steps=rung.steps, batch_size=rung.batch_size, eval_every=rung.eval_every,
                 checkpoint_every=rung.checkpoint_every, keep_checkpoints=rung.keep_checkpoints,
                 log_every=max(1, min(rung.log_every, rung.steps)))
    run["train"] = train
    if rung.unique_tokens is not None:
        run["data"] = {**(run.get("data") or {}), "unique_tokens": rung.unique_tokens}
    try:
        return RunConfig.from_dict(run).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"rung {rung.name}: {exc}") from None


def write_plan(plan: LadderPlan, command: list[str] | None = None) -> list[Path]:
    """Write ``configs/<rung>.yaml`` for every rung and ``ladder_plan.json``; returns the paths."""
    import yaml

    written = []
    for rung in plan.rungs:
        text = f"# rung {rung.name} of ladder {plan.cfg.name} (generated by lmforge scaling ladder)\n"
        text += yaml.safe_dump(plan.run_configs[rung.name], sort_keys=False)
        written.append(atomic_write_text(plan.config_path(rung), text))
    written.append(atomic_write_json(plan.ladder_dir / PLAN_FILE, {
        "format": "lmforge.scaling.ladder_plan/1",
        "ladder": plan.cfg.to_dict(),
        "base": plan.base,
        "vocab_size": plan.vocab_size,
        "command": command,
        "compute_formula": "C = 6 * N_active * D, D = steps * batch_size * seq_len",
        "rungs": [rung.to_dict() for rung in plan.rungs],
    }))
    return written
