"""Plan a training run from a fitted loss law: how big a model, how many tokens, what shape.

**Compute-optimal (Hoffmann et al. 2022).** With training compute C = 6·N·D (N the
parameters a token passes through: the active parameters of a mixture of experts), the
loss L(N, D) = E + A/N^α + B/D^β is lowest at

    N_opt = G·(C/6)^a,  D_opt = G⁻¹·(C/6)^b,  a = β/(α+β),  b = α/(α+β),  G = (αA/(βB))^(1/(α+β)).

For a data-constrained law with U unique tokens the closed form no longer holds and
L(N, C/(6N)) is minimised over ln N numerically (scipy's bounded Brent method).

**Inference-aware (Sardana et al. 2023).** A model that will serve I tokens costs
2·N·I FLOPs more. Among models reaching the compute-optimal loss L* we minimise

    cost(N) = 6·N·D(N) + 2·N·I,   D(N) = (B / (L* − E − A·N^−α))^(1/β),

over N_min < N ≤ N_opt, where N_min = (A/(L* − E))^(1/α) is the size that would need
infinite data. Training cost alone is lowest at N_opt and inference cost grows with N,
so the answer is a smaller model trained on more tokens.

**Shape.** :func:`propose_shape` turns a parameter count into a ``ModelConfig`` under the
size rule the ladder uses (``scaling.shape.ShapeRule``: d_model = aspect_ratio·n_layers
rounded to a multiple of the head size, SwiGLU 8/3·d_model), counting parameters exactly
with ``lmforge.nn.counting``.

Intervals come from the fit's bootstrap laws: every quantity is recomputed under each
resampled law and the central percentile interval taken.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy.optimize import minimize_scalar

from lmforge.core.errors import DataError
from lmforge.nn.config import ModelConfig, MoEConfig
from lmforge.nn.counting import count_parameters, flops_per_token
from lmforge.scaling.fit import LossLaw
from lmforge.scaling.fit_bootstrap import percentile_interval
from lmforge.scaling.shape import ShapeRule


def compute_optimal(law: LossLaw, compute: float, unique_tokens: float | None = None) -> tuple[float, float, float]:
    """(N_opt, D_opt, L(N_opt, D_opt)) for training compute C = 6·N·D."""
    if not compute > 0:
        raise DataError(f"compute must be positive, got {compute}")
    n_opt, d_opt = (float(v) for v in law.compute_optimal(compute))
    if law.r_star is not None and unique_tokens is not None:
        def loss_at(log_n: float) -> float:
            n = math.exp(log_n)
            return float(law.loss(n, compute / (6.0 * n), unique_tokens))

        high = math.log(compute / 6.0)  # D >= 1 token
        res = minimize_scalar(loss_at, bounds=(math.log(n_opt) - 12.0, high), method="bounded",
                              options={"xatol": 1e-9})
        n_opt, d_opt = math.exp(res.x), compute / (6.0 * math.exp(res.x))
    return n_opt, d_opt, float(law.loss(n_opt, d_opt, unique_tokens))


def tokens_for_loss(law: LossLaw, params: float, target_loss: float, unique_tokens: float | None = None) -> float:
    """Tokens D with L(N, D) = target (``inf`` when N is too small to ever reach it).

    Plain law: D = (B / (target − E − A·N^−α))^(1/β). Data-constrained: that is the
    effective data D' needed; inverting D' = U + U·R*·(1 − e^{−R/R*}) gives
    R = −R*·ln(1 − (D'/U − 1)/R*) and D = U·(1 + R), possible only while D' < U·(1 + R*).
    """
    gap = target_loss - law.E - law.A * params ** -law.alpha
    if gap <= 0:
        return math.inf
    needed = (law.B / gap) ** (1.0 / law.beta)
    if law.r_star is None or unique_tokens is None or needed <= unique_tokens:
        return needed
    fraction = (needed / unique_tokens - 1.0) / law.r_star
    if fraction >= 1.0:
        return math.inf
    return unique_tokens * (1.0 - law.r_star * math.log1p(-fraction))


def inference_optimal(law: LossLaw, target_loss: float, inference_tokens: float, params_max: float,
                      unique_tokens: float | None = None) -> tuple[float, float]:
    """(N, D) minimising 6·N·D + 2·N·I among models with L(N, D) = target, N ≤ params_max."""
    if inference_tokens < 0:
        raise DataError(f"inference tokens must be >= 0, got {inference_tokens}")
    if target_loss <= law.E:
        raise DataError(f"target loss {target_loss} is at or below the irreducible loss E = {law.E}")
    n_min = (law.A / (target_loss - law.E)) ** (1.0 / law.alpha)

    def cost(log_n: float) -> float:
        n = math.exp(log_n)
        d = tokens_for_loss(law, n, target_loss, unique_tokens)
        return math.log(6.0 * n * d + 2.0 * n * inference_tokens) if math.isfinite(d) else 1e300

    low, high = math.log(n_min) + 1e-9, math.log(params_max)
    if not low < high:
        return params_max, tokens_for_loss(law, params_max, target_loss, unique_tokens)
    res = minimize_scalar(cost, bounds=(low, high), method="bounded", options={"xatol": 1e-10})
    n = math.exp(res.x) if cost(res.x) <= cost(high) else params_max
    return n, tokens_for_loss(law, n, target_loss, unique_tokens)


@dataclass
class Estimate:
    """A value with an optional bootstrap interval."""

    value: float
    low: float | None = None
    high: float | None = None


@dataclass
class InferencePlan:
    inference_tokens: float
    params: Estimate
    tokens: Estimate
    train_compute: Estimate
    total_cost: Estimate                 # 6·N·D + 2·N·I of this model
    compute_optimal_total_cost: Estimate  # the same for the compute-optimal model
    params_ratio: Estimate               # N_opt / N  (how many times smaller)
    tokens_ratio: Estimate               # D / D_opt  (how many times longer trained)
    cost_saving: Estimate                # 1 − total_cost / compute_optimal_total_cost


@dataclass
class Plan:
    compute: float
    params: Estimate
    tokens: Estimate
    loss: Estimate
    tokens_per_param: Estimate
    unique_tokens: float | None = None
    inference: InferencePlan | None = None
    law: dict = field(default_factory=dict)
    n_bootstrap: int = 0
    level: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _plan_numbers(law: LossLaw, compute: float, inference_tokens: float | None,
                  unique_tokens: float | None) -> dict[str, float]:
    n, d, loss = compute_optimal(law, compute, unique_tokens)
    out = {"params": n, "tokens": d, "loss": loss, "tokens_per_param": d / n}
    if inference_tokens is not None:
        n_i, d_i = inference_optimal(law, loss, inference_tokens, n, unique_tokens)
        total = 6.0 * n_i * d_i + 2.0 * n_i * inference_tokens
        total_opt = 6.0 * n * d + 2.0 * n * inference_tokens
        out.update(inf_params=n_i, inf_tokens=d_i, inf_train_compute=6.0 * n_i * d_i, inf_total_cost=total,
                   opt_total_cost=total_opt, params_ratio=n / n_i, tokens_ratio=d_i / d,
                   cost_saving=1.0 - total / total_opt)
    return out


def plan(law: LossLaw, compute: float, inference_tokens: float | None = None, unique_tokens: float | None = None,
         samples: Sequence[LossLaw] = (), level: float = 0.95) -> Plan:
    """Compute-optimal (and, with ``inference_tokens``, inference-aware) plan for ``compute``
    FLOPs, with percentile intervals over the bootstrap ``samples`` laws."""
    point = _plan_numbers(law, compute, inference_tokens, unique_tokens)
    spread: dict[str, list[float]] = {k: [] for k in point}
    for sample in samples:
        try:
            for key, value in _plan_numbers(sample, compute, inference_tokens, unique_tokens).items():
                spread[key].append(value)
        except (DataError, ValueError, OverflowError, ZeroDivisionError):
            continue

    def est(key: str) -> Estimate:
        if not spread[key]:
            return Estimate(point[key])
        return Estimate(point[key], *percentile_interval(np.asarray(spread[key]), level))

    result = Plan(compute=compute, params=est("params"), tokens=est("tokens"), loss=est("loss"),
                  tokens_per_param=est("tokens_per_param"), unique_tokens=unique_tokens, law=law.to_dict(),
                  n_bootstrap=len(samples), level=level if samples else None)
    if inference_tokens is not None:
        result.inference = InferencePlan(
            inference_tokens=inference_tokens, params=est("inf_params"), tokens=est("inf_tokens"),
            train_compute=est("inf_train_compute"), total_cost=est("inf_total_cost"),
            compute_optimal_total_cost=est("opt_total_cost"), params_ratio=est("params_ratio"),
            tokens_ratio=est("tokens_ratio"), cost_saving=est("cost_saving"),
        )
    return result


# --------------------------------------------------------------------------- model shape

ParamCount = Literal["active", "active_non_embedding"]


@dataclass
class ShapeProposal:
    config: ModelConfig
    params: int           # the count compared with the target (see ``count``)
    total_params: int     # every stored parameter (all experts)
    active_params: int
    flops_per_token: int  # training FLOPs per token at ``seq_len``, attention included
    target_params: float
    count: str

    @property
    def relative_error(self) -> float:
        return self.params / self.target_params - 1.0


def _counted(cfg: ModelConfig, count: ParamCount) -> int:
    counts = count_parameters(cfg)
    if count == "active":
        return counts.active
    return counts.active - counts.embedding - counts.lm_head


def propose_shape(target_params: float, rule: ShapeRule | None = None, vocab_size: int | None = None,
                  seq_len: int | None = None, n_experts: int | None = None, top_k: int = 2,
                  count: ParamCount = "active", max_layers: int = 256) -> ShapeProposal:
    """The ModelConfig nearest ``target_params`` (in log ratio) among the shapes of ``rule``
    (default: :class:`ShapeRule`'s defaults, aspect ratio 128, head size 64) for
    n_layers = 1 … ``max_layers``.

    With ``n_experts`` it is a mixture of experts (``top_k`` routed per token) whose *active*
    count is matched. ``count`` says which count is compared: all active parameters, or
    active without the embedding and output head — use the same definition as the fitted N.
    """
    if target_params <= 0:
        raise DataError(f"target parameter count must be positive, got {target_params}")
    if count not in ("active", "active_non_embedding"):
        raise DataError(f"count must be 'active' or 'active_non_embedding', got {count!r}")
    rule = rule or ShapeRule()
    defaults = ModelConfig()
    vocab_size = vocab_size or defaults.vocab_size
    seq_len = seq_len or defaults.max_seq_len
    best: tuple[float, ModelConfig, int] | None = None
    for n_layers in range(1, max_layers + 1):
        d_model = rule.d_model(n_layers)
        moe = MoEConfig(n_experts=n_experts, top_k=top_k, d_expert=rule.expert_hidden(d_model)) if n_experts else None
        cfg = ModelConfig(vocab_size=vocab_size, max_seq_len=seq_len, moe=moe, **rule.model_fields(d_model, n_layers))
        counted = _counted(cfg, count)
        distance = abs(math.log(counted / target_params))
        if best is None or distance < best[0]:
            best = (distance, cfg, counted)
        elif counted > target_params:
            break  # counts grow with n_layers: past the target, further shapes only get worse
    assert best is not None
    _, cfg, counted = best
    counts = count_parameters(cfg)
    return ShapeProposal(config=cfg, params=counted, total_params=counts.total, active_params=counts.active,
                         flops_per_token=flops_per_token(cfg, seq_len), target_params=float(target_params),
                         count=count)
