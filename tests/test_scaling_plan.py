"""The planner's arithmetic: C = 6·N·D, the inference-aware plan reaches the same loss for
less total cost with a smaller model, and proposed shapes are counted exactly."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before scipy loads; see lmforge.scaling.fit

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lmforge.core.errors import DataError  # noqa: E402
from lmforge.nn.config import ModelConfig  # noqa: E402
from lmforge.nn.counting import count_parameters  # noqa: E402
from lmforge.scaling.fit import PUBLISHED_LAWS, LossLaw  # noqa: E402
from lmforge.scaling.plan import (  # noqa: E402
    compute_optimal,
    inference_optimal,
    plan,
    propose_shape,
    tokens_for_loss,
)
from lmforge.scaling.shape import ShapeRule  # noqa: E402

LAW = PUBLISHED_LAWS["hoffmann2022"]


@pytest.mark.parametrize("compute", [1e18, 1e21, 5.76e23])
def test_compute_optimal_spends_the_budget_and_minimises_loss(compute):
    n, d, loss = compute_optimal(LAW, compute)
    assert 6 * n * d == pytest.approx(compute, rel=1e-12)
    assert loss == pytest.approx(float(LAW.loss(n, d)))
    for factor in (0.8, 1.25):  # any other split of the same compute is worse
        assert LAW.loss(n * factor, d / factor) > loss
    assert n == pytest.approx(LAW.G * (compute / 6) ** LAW.a)


def test_chinchilla_budget_matches_the_closed_form():
    n, d, _ = compute_optimal(LAW, 5.76e23)  # Gopher's budget
    # a = 0.28/0.62, G = (0.34·406.4 / (0.28·410.7))^(1/0.62) with the published, rounded values
    g = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    assert n == pytest.approx(g * (5.76e23 / 6) ** (0.28 / 0.62))
    assert 2e10 < n < 5e10 and 2e12 < d < 5e12


def test_tokens_for_loss_inverts_the_law():
    target = 2.2
    for n in (1e9, 1e10):
        d = tokens_for_loss(LAW, n, target)
        assert LAW.loss(n, d) == pytest.approx(target, rel=1e-12)
    assert tokens_for_loss(LAW, 1e6, target) == math.inf  # too small to ever get there
    constrained = LossLaw(**{**LAW.to_dict(), "r_star": 15.0})
    d = tokens_for_loss(constrained, 1e10, target, unique_tokens=2e10)
    assert d > tokens_for_loss(LAW, 1e10, target)  # repeated tokens are worth less
    assert constrained.loss(1e10, d, 2e10) == pytest.approx(target, rel=1e-10)
    assert tokens_for_loss(constrained, 1e10, target, unique_tokens=1e9) == math.inf  # data runs out


@pytest.mark.parametrize("inference_tokens", [1e11, 2e12, 5e13])
def test_inference_aware_plan_is_smaller_longer_and_cheaper(inference_tokens):
    compute = 1e22
    result = plan(LAW, compute, inference_tokens=inference_tokens)
    inf = result.inference
    n, d = result.params.value, result.tokens.value
    n_i, d_i = inf.params.value, inf.tokens.value
    assert LAW.loss(n_i, d_i) == pytest.approx(result.loss.value, rel=1e-9)  # same loss
    assert n_i < n and d_i > d
    total_i = 6 * n_i * d_i + 2 * n_i * inference_tokens
    total = 6 * n * d + 2 * n * inference_tokens
    assert inf.total_cost.value == pytest.approx(total_i)
    assert inf.compute_optimal_total_cost.value == pytest.approx(total)
    assert total_i < total
    assert inf.params_ratio.value == pytest.approx(n / n_i)
    assert inf.tokens_ratio.value == pytest.approx(d_i / d)
    # and it is the cheapest model on the iso-loss curve: neighbours cost more
    for factor in (0.97, 1.03):
        m = n_i * factor
        assert 6 * m * tokens_for_loss(LAW, m, result.loss.value) + 2 * m * inference_tokens > total_i


def test_without_inference_the_two_plans_agree():
    n, d, loss = compute_optimal(LAW, 1e21)
    n_i, d_i = inference_optimal(LAW, loss, 0.0, params_max=n)
    assert n_i == pytest.approx(n, rel=1e-4) and d_i == pytest.approx(d, rel=1e-3)


def test_data_constrained_plan_uses_a_bigger_model_when_data_is_short():
    constrained = LossLaw(**{**LAW.to_dict(), "r_star": 15.0})
    n_free, _, loss_free = compute_optimal(constrained, 1e23)
    n_short, d_short, loss_short = compute_optimal(constrained, 1e23, unique_tokens=1e11)
    assert n_free == pytest.approx(compute_optimal(LAW, 1e23)[0])
    assert n_short > n_free and loss_short > loss_free
    assert 6 * n_short * d_short == pytest.approx(1e23)


def test_plan_intervals_from_bootstrap_laws():
    rng = np.random.default_rng(0)
    samples = [LossLaw(E=LAW.E, A=LAW.A, B=LAW.B, alpha=LAW.alpha + e1, beta=LAW.beta + e2)
               for e1, e2 in rng.normal(0, 0.01, size=(30, 2))]
    result = plan(LAW, 1e21, inference_tokens=1e12, samples=samples, level=0.9)
    for est in (result.params, result.tokens, result.loss, result.inference.params):
        assert est.low < est.value < est.high
    assert result.n_bootstrap == 30
    with pytest.raises(DataError, match="compute must be positive"):
        plan(LAW, 0.0)


def test_proposed_shape_follows_the_size_rule_and_counts_exactly():
    shape = propose_shape(1.3e9, ShapeRule(aspect_ratio=128), vocab_size=32000, seq_len=2048)
    cfg = shape.config
    assert cfg.head_dim == 64 and cfg.d_model % 64 == 0
    assert cfg.d_model == 64 * round(128 * cfg.n_layers / 64)
    assert shape.params == count_parameters(cfg).active
    assert abs(shape.relative_error) < 0.1
    assert cfg.resolved_d_ff == ModelConfig(d_model=cfg.d_model, n_heads=cfg.n_heads).resolved_d_ff


def test_plan_and_ladder_share_one_size_rule():
    from lmforge.scaling.ladder.config import GridRule, LadderConfig, SizeRule
    from lmforge.scaling.ladder.plan import model_section

    shape = propose_shape(3e8, vocab_size=32000)
    cfg = shape.config
    # A ladder size at the proposal's depth, with the sizes section's defaults, is the same model.
    ladder = LadderConfig(name="x", base={}, sizes=SizeRule(n_layers=[cfg.n_layers]), grid=GridRule(tokens=[1e6]))
    assert ladder.sizes.aspect_ratio == ShapeRule().aspect_ratio
    [(d_model, n_layers)] = ladder.sizes.dims()
    section = model_section(ladder, {"max_seq_len": cfg.max_seq_len}, d_model, n_layers, 32000)
    assert ModelConfig.from_dict(section) == cfg


def test_proposed_moe_shape_matches_active_parameters():
    shape = propose_shape(5e8, n_experts=8, top_k=2, count="active_non_embedding")
    counts = count_parameters(shape.config)
    assert shape.params == counts.active - counts.embedding - counts.lm_head
    assert shape.total_params > shape.active_params  # idle experts are stored, not used
    assert abs(shape.relative_error) < 0.15
