"""Speed options of the speedrun ledger: grouped MoE experts, the fused LM-head cross-entropy, bf16
autocast on CPU — each computes what the reference computes, and a run with them on resumes bit
for bit."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_run_dict, train_losses, write_config
from lmforge.core.device import autocast_context
from lmforge.nn.config import ModelConfig
from lmforge.nn.cross_entropy import linear_cross_entropy
from lmforge.nn.moe import MoE, WeightedCombine, expert_kernel, padded_runs, row_multiple, run_lengths
from lmforge.nn.norm import rms_norm
from lmforge.nn.rope import RotaryEmbedding


def _moe(**moe) -> MoE:
    cfg = ModelConfig.from_dict({"d_model": 32, "n_layers": 1, "n_heads": 2,
                                 "moe": {"n_experts": 4, "top_k": 2, "d_expert": 48, **moe}})
    torch.manual_seed(0)
    return MoE(cfg)


def _forward_backward(layer: MoE, kernel: str, x: torch.Tensor) -> list[torch.Tensor]:
    layer.expert_compute = kernel
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach(), x.grad, layer.router.weight.grad,
            *[p.grad if p.grad is not None else torch.zeros_like(p) for e in layer.experts for p in e.parameters()]]


@pytest.mark.parametrize("kernel", ["batched", "grouped_mm"])
@pytest.mark.parametrize("moe", [{}, {"top_k": 1}, {"n_shared_experts": 1}])
def test_grouped_experts_equal_the_loop(kernel, moe):
    layer = _moe(**moe)
    x = torch.randn(3, 20, 32)
    reference = _forward_backward(layer, "loop", x)
    grouped = _forward_backward(layer, kernel, x)
    for ours, theirs in zip(grouped, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert layer.last_tokens_per_expert.sum() == 60 * layer.top_k


def test_grouped_experts_with_an_idle_expert():
    layer = _moe()
    with torch.no_grad():
        layer.router.weight[3] = -10.0 * layer.router.weight[:3].sum(0)  # steer every token away from expert 3
        layer.router.weight[3] -= 5.0
    x = torch.randn(2, 16, 32).abs()
    reference = _forward_backward(layer, "loop", x)
    assert layer.last_tokens_per_expert[3] == 0
    for ours, theirs in zip(_forward_backward(layer, "batched", x), reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_expert_compute_is_checked_and_resolved():
    with pytest.raises(Exception, match="expert_compute"):
        ModelConfig.from_dict({"moe": {"expert_compute": "fast"}})
    assert expert_kernel("auto", torch.device("cpu")) == "loop"
    assert expert_kernel("auto", torch.device("cpu"), torch.bfloat16, (128, 192)) == "batched"
    assert expert_kernel("auto", torch.device("cpu"), torch.bfloat16, (512, 768)) == "loop"  # large experts
    assert expert_kernel("auto", torch.device("cuda"), torch.bfloat16, (128, 384)) == "grouped_mm"
    assert expert_kernel("auto", torch.device("cuda"), torch.float32, (128, 384)) == "loop"
    assert expert_kernel("auto", torch.device("cuda"), torch.bfloat16, (128, 100)) == "loop"
    assert expert_kernel("loop", torch.device("cuda")) == "loop"


@pytest.mark.parametrize("kernel", ["loop", "batched"])
@pytest.mark.parametrize("moe", [{}, {"top_k": 1}, {"n_shared_experts": 1}])
def test_padded_expert_runs_compute_what_the_unpadded_loop_computes(moe, kernel):
    """moe.expert_rows_multiple: each expert's rows padded (slots reading token 0 with weight 0;
    for ``batched``, every run to the longest) give the same output and the same gradients as the
    loop without padding."""
    x = torch.randn(3, 21, 32)
    reference = _forward_backward(_moe(**moe, expert_rows_multiple=1), "loop", x)
    for multiple in (1, 7, 64):
        layer = _moe(**moe, expert_rows_multiple=multiple)
        for ours, theirs in zip(_forward_backward(layer, kernel, x), reference):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        assert layer.last_tokens_per_expert.sum() == 63 * layer.top_k  # the statistics count real slots only


def test_auto_batches_the_experts_on_cpu_in_bf16_unless_the_load_is_too_uneven():
    """moe.expert_compute: auto on CPU under bf16 autocast pads every run to the longest and batches
    the experts; a router that sends every token to the same two experts would pad the idle ones
    to 2,048 rows each, so that step takes the loop instead (nn/moe.py, auto_layout)."""
    layer = _moe()
    x = torch.randn(2048, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        balanced = layer.route(x)
    assert balanced.kernel == "batched" and len(set(balanced.run_lengths.tolist())) == 1
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:2, 0], layer.router.weight[2:, 0] = 5.0, -5.0
    x[:, 0] = x[:, 0].abs() + 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        skewed = layer.route(x)
    assert skewed.counts.tolist() == [2048, 2048, 0, 0]
    assert skewed.kernel == "loop" and skewed.run_lengths.tolist() == [2048, 2048, 0, 0]
    layer.expert_compute = "batched"  # asked for by name: batched whatever the load
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.route(x).run_lengths.tolist() == [2048] * 4
    layer.expert_compute = "auto"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.route(torch.randn(8, 32)).kernel == "loop"  # a few tokens (decoding): the loop
        for kernel in ("auto", "batched"):  # and no tokens at all
            layer.expert_compute = kernel
            assert layer(torch.randn(2, 0, 32)).shape == (2, 0, 32)


def test_padded_runs_layout():
    counts = torch.tensor([3, 0, 5])
    slot_tokens = torch.tensor([4, 5, 6, 1, 2, 3, 7, 8])
    weights = torch.arange(1.0, 9.0)[:, None]
    runs = run_lengths(counts, 4, "loop")
    assert runs.tolist() == [4, 0, 8]
    assert run_lengths(counts, 4, "batched").tolist() == [8, 8, 8]
    tokens, padded_weights = padded_runs(slot_tokens, weights, torch.tensor([0, 0, 0, 2, 2, 2, 2, 2]), counts, runs)
    assert tokens.tolist() == [4, 5, 6, 0, 1, 2, 3, 7, 8, 0, 0, 0]
    assert padded_weights.squeeze(1).tolist() == [1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 0, 0]
    assert row_multiple(None, torch.device("cpu"), "loop", torch.bfloat16) == 64
    assert row_multiple(None, torch.device("cpu"), "loop", torch.float32) == 1
    assert row_multiple(None, torch.device("cpu"), "batched", torch.bfloat16) == 64
    assert row_multiple(16, torch.device("cpu"), "grouped_mm", torch.bfloat16) == 1
    assert row_multiple(None, torch.device("cuda"), "loop") == 1
    assert row_multiple(16, torch.device("cuda"), "loop") == 16
    with pytest.raises(Exception, match="expert_rows_multiple"):
        ModelConfig.from_dict({"moe": {"expert_rows_multiple": 0}})


def test_weighted_combine_by_hand_equals_autograd_of_the_textbook_form():
    """nn/moe.py weights and scatters the experts' runs back by hand; autograd of cat, multiply and
    index_add_ is the reference: float64 gradcheck, an empty run, padding slots of weight 0."""
    torch.manual_seed(0)
    slot_tokens = torch.tensor([2, 0, 4, 1, 0, 3, 2, 4, 0, 0])       # token 0 twice as padding at the end
    weights = torch.cat([torch.rand(8), torch.zeros(2)]).double().requires_grad_()
    runs = [torch.randn(n, 6, dtype=torch.float64, requires_grad=True) for n in (3, 0, 5, 2)]
    torch.autograd.gradcheck(lambda w, *r: WeightedCombine.apply(slot_tokens, w, 5, *r), (weights, *runs))

    def reference(w, *r):
        return torch.zeros(5, 6, dtype=torch.float64).index_add(0, slot_tokens, torch.cat(r) * w[:, None])

    grad = torch.randn(5, 6, dtype=torch.float64)
    ours = torch.autograd.grad(WeightedCombine.apply(slot_tokens, weights, 5, *runs), (weights, *runs), grad)
    theirs = torch.autograd.grad(reference(weights, *runs), (weights, *runs), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    # bf16 runs with fp32 weights: the output in bf16, the weights' gradient in fp32, both near fp32's
    runs16 = [r.detach().bfloat16().requires_grad_() for r in runs]
    w32 = weights.detach().float().requires_grad_()
    out16 = WeightedCombine.apply(slot_tokens, w32, 5, *runs16)
    assert out16.dtype == torch.bfloat16
    (w_grad,) = torch.autograd.grad(out16, w32, grad.bfloat16())
    assert w_grad.dtype == torch.float32
    torch.testing.assert_close(out16.double(), reference(weights, *runs).detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w_grad.double(), theirs[0], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("moe", [{}, {"top_k": 1}, {"expert_rows_multiple": 64}, {"expert_compute": "loop"}])
def test_moe_gradients_under_bf16_autocast_stay_near_float64(moe):
    """The MoE layer under CPU bf16 autocast (bf16 experts and combine, fp32 router softmax) against
    the same layer in float64: output and every gradient within bf16-level error (norm-relative),
    the router's included although the combine's backward runs in bf16."""
    layer = _moe(**moe)
    x = torch.randn(4, 64, 32)
    reference = copy.deepcopy(layer).double()
    ours = _forward_backward_autocast(layer, x, bf16=True)
    theirs = _forward_backward_autocast(reference, x.double(), bf16=False)
    for name, a, b in zip(("output", "input", "router", "experts"), ours, theirs):
        error = float((a.double() - b).norm() / b.norm())
        assert error < 1.5e-2, f"{name}: relative error {error:.2e}"


def _forward_backward_autocast(layer: MoE, x: torch.Tensor, bf16: bool) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    loss = (y.float() * torch.linspace(-1, 1, y.shape[-1], dtype=torch.float64).to(y.dtype).float()).sum()
    (loss.double() + layer.last_load_balance_loss.double() + layer.last_z_loss.double()).backward()
    experts = torch.cat([p.grad.flatten() for e in layer.experts for p in e.parameters()])
    return [y.detach(), x.grad, layer.router.weight.grad, experts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positions", [False, True])
def test_rotary_backward_by_hand_equals_autograd_of_the_textbook_form(dtype, positions):
    """nn/rope.py rotates forward and backward by hand; autograd of x*cos + rotate_half(x)*sin is
    the reference, on a transposed (non-contiguous) q as attention passes it."""
    from lmforge.nn.attention import rotate_at

    rope = RotaryEmbedding(16, 64)
    x = torch.randn(2, 9, 3, 16, dtype=dtype).transpose(1, 2).requires_grad_()
    grad = torch.randn(2, 3, 9, 16, dtype=dtype)
    if positions:
        index = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
        cos, sin = rope.cos[index].to(dtype)[:, None], rope.sin[index].to(dtype)[:, None]
        ours = rotate_at(rope, x, index)
    else:
        cos, sin = rope.cos[4:13].to(dtype), rope.sin[4:13].to(dtype)
        ours = rope(x, 4)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    first, second = x.chunk(2, dim=-1)
    reference = x * cos + torch.cat([-second, first], dim=-1) * sin
    (reference_grad,) = torch.autograd.grad(reference, x, grad)
    tolerance = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}  # bf16: one rounding fewer here
    torch.testing.assert_close(ours, reference, **tolerance)
    torch.testing.assert_close(ours_grad, reference_grad, **tolerance)
    with torch.no_grad():  # no autograd: the same rotation without the Function
        plain = rotate_at(rope, x, index) if positions else rope(x, 4)
    torch.testing.assert_close(plain, ours.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 7, 24), (10, 24)])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_rms_norm_backward_by_hand_equals_autograd_of_f_rms_norm(shape, needs):
    x = torch.randn(*shape).requires_grad_(needs[0])
    weight = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_(needs[1])
    grad = torch.randn(*shape)
    wanted = [t for t in (x, weight) if t.requires_grad]
    ours = rms_norm(x, weight, 1e-5)
    reference = F.rms_norm(x, (shape[-1],), weight, 1e-5)
    assert ours.grad_fn is not None and "RMSNorm" in type(ours.grad_fn).__name__  # the hand-written one ran
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(ours, wanted, grad), torch.autograd.grad(reference, wanted, grad)):
        torch.testing.assert_close(a, b)


def test_fused_cross_entropy_equals_the_plain_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = (0.3 * torch.randn(64, 16)).requires_grad_()
    targets = torch.randint(0, 60, (2, 37))
    targets[0, :5] = -100
    plain = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), targets.flatten(), ignore_index=-100)
    plain.backward()
    expected = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)  # chunks that do not divide the rows
    (2 * fused).backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(hidden.grad, 2 * expected[0])
    torch.testing.assert_close(weight.grad, 2 * expected[1])


def test_fused_cross_entropy_under_bf16_autocast_follows_the_plain_loss():
    """The quickstart's case: head matmuls in bf16, softmax and loss in fp32 in both."""
    torch.manual_seed(1)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = (0.2 * torch.randn(500, 32)).requires_grad_()
    targets = torch.randint(0, 500, (300,))
    grads = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (linear_cross_entropy(hidden, weight, targets, chunk_rows=128) if fused
                    else F.cross_entropy((hidden @ weight.t()).float(), targets))
        loss.backward()
        grads.append((loss.detach(), hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    (plain, plain_h, plain_w), (fused, fused_h, fused_w) = grads
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    for ours, theirs in ((fused_h, plain_h), (fused_w, plain_w)):   # bf16 rounding: compare as a whole
        assert (ours - theirs).norm() < 0.01 * theirs.norm()


def test_head_loss_bench_times_every_variant():
    bench = Path(__file__).resolve().parents[1] / "bench" / "head_loss.py"
    out = subprocess.run([sys.executable, str(bench), "--rows", "64", "--vocab", "50", "--d-model", "8",
                          "--chunks", "16,64", "--rounds", "1"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["results"]) == {"fp32", "bf16"}
    assert set(result["results"]["fp32"]) == {"plain", "matmuls", "fused_16", "fused_64"}
    assert all(v["ms"] > 0 for v in result["results"]["bf16"].values())


def test_model_with_fused_loss_trains_as_the_plain_one_and_still_evaluates():
    settings = {"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 100, "max_seq_len": 16,
                "moe": {"n_experts": 4, "top_k": 2}}
    inputs = torch.randint(0, 100, (2, 16))
    targets = torch.randint(0, 100, (2, 16))
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = ModelConfig.from_dict({**settings, "fused_cross_entropy": fused}).build()
        out = model(inputs, targets)
        (out.loss + out.aux_loss).backward()
        results.append((out.loss.detach(), model.embed.weight.grad.clone(), model.blocks[0].attn_norm.weight.grad))
        with torch.no_grad():  # evaluation: logits as always
            assert model(inputs, targets).logits.shape == (2, 16, model.cfg.padded_vocab_size)
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_bf16_on_cpu_is_asked_for_not_assumed():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    for precision in ("auto", "fp32"):
        with autocast_context(torch.device("cpu"), precision):
            assert (a @ b).dtype == torch.float32


def test_fast_precision_is_bf16_only_where_the_hardware_multiplies_it_natively(monkeypatch):
    from lmforge.core import device as device_module

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert device_module.uses_bf16(cuda, "fast") and device_module.uses_bf16(cuda, "auto")
    assert not device_module.uses_bf16(cuda, "fp32")
    assert device_module.cpu_has_native_bf16() in (True, False)  # the real check: this CPU's flags
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda native=native: native)
        with autocast_context(cpu, "fast"):
            assert (a @ b).dtype == expected


# The MoE speed options, and the dense model with every architecture option of the ledger
# (tests/test_arch_options.py); both with the explicit attention kernel (model.attention.kernel).
RESUME_MODELS = {
    "moe": {"fused_cross_entropy": True, "tie_embeddings": False, "attention": {"kernel": "explicit"},
            "moe": {"n_experts": 4, "top_k": 2, "expert_compute": "auto"}},  # bf16 on CPU: batched, loop on uneven steps
    "moe_padded_runs": {"fused_cross_entropy": True, "moe": {"n_experts": 4, "top_k": 2, "expert_compute": "loop",
                                                             "expert_rows_multiple": 8}},
    "dense_arch": {"fused_cross_entropy": True, "tie_embeddings": False, "attention": {"kernel": "explicit"},
                   "moe": None, "mlp_activation": "relu2", "logit_softcap": 15.0, "value_embeddings": True,
                   "skip_connections": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(RESUME_MODELS))
def test_resume_is_bit_identical_with_the_speed_options_on(tmp_path, tiny_corpus, model):
    base = tiny_run_dict(tmp_path, tiny_corpus, optim={"name": "muon", "lr": 0.003, "warmup_steps": 2,
                                                       "schedule": "wsd", "min_lr_ratio": 0.0})
    base["model"] = {**base["model"], **RESUME_MODELS[model]}
    base["train"] = {**base["train"], "precision": "bf16"}
    whole = write_config(tmp_path / "a.yaml", {**base, "name": "a"})
    killed = write_config(tmp_path / "b.yaml", {**base, "name": "b"})
    assert run_cli("train", str(whole)).returncode == 0
    crash = run_cli("train", str(killed), env={"LMFORGE_CRASH_AT_STEP": "10"})
    assert crash.returncode == -signal.SIGKILL
    resumed = run_cli("train", str(killed), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    a, b = train_losses(tmp_path / "runs" / "a"), train_losses(tmp_path / "runs" / "b")
    assert sorted(a) == list(range(1, 13))
    assert a == b


def test_bf16_qk_norm_prints_no_torch_warning():
    """A bf16 input with the fp32 norm weight (QK-norm under autocast) must not print torch's
    'cannot dispatch to fused implementation' warning into every bf16 run's log."""
    code = ("import torch\nfrom lmforge.nn.norm import RMSNorm\n"
            "out = RMSNorm(8)(torch.randn(2, 8, dtype=torch.bfloat16))\nprint(out.dtype)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "torch.bfloat16"
    assert "Mismatch dtype" not in result.stderr and "Warning" not in result.stderr
