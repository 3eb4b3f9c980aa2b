"""The MoE's dispatch, experts and combine as one autograd node, one expert's run at a time (CPU).

``moe.expert_compute: fused_loop``. Through autograd, the ``loop`` kernel makes several passes over
[slots, d_model] tensors besides the experts' matmuls: the rows gathered, the experts' outputs
concatenated, weighted and added into the tokens' outputs; in the backward the gradients gathered,
a product and sum for the routing weights' gradient, the weighting again, the rows' gradients
concatenated and added back. This node does the same per expert run instead, while the run is in
cache: gather, SwiGLU, weighting and scatter-add, and likewise backward, with no [slots, d_model]
tensor besides the gathered rows. No library offers this on CPU in torch 2.13, hence the
hand-written backward. Measured no faster than ``loop`` (docs/speedrun.md).

Equal to the autograd path: tests/test_speed_options.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ExpertRunsFunction(torch.autograd.Function):
    """``out[t] = sum over slots s of token t: weight[s] * expert_s(tokens[t])`` with SwiGLU experts.

    ``tokens``: [N, d_model] in the compute dtype; ``slot_tokens``: the token of each slot, sorted
    by expert; ``slot_weights``: [slots] routing weights in the output dtype; ``lengths``: each
    expert's run of slots (Python ints); ``matrices``: gate, up and down weights of expert 0, then
    expert 1, ... in their own dtype (cast to the compute dtype for the matmuls; their gradients
    returned in their own).
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, slot_tokens: torch.Tensor, slot_weights: torch.Tensor,  # type: ignore[override]
                lengths: list[int], *matrices: torch.Tensor) -> torch.Tensor:
        compute = tokens.dtype
        out = torch.zeros(tokens.shape, dtype=slot_weights.dtype, device=tokens.device)
        saved = []
        with torch.autocast(tokens.device.type, enabled=False):
            start = 0
            for e, length in enumerate(lengths):
                gate_w, up_w, down_w = matrices[3 * e:3 * e + 3]
                index = slot_tokens[start:start + length]
                run = tokens.index_select(0, index)
                gate, up = run @ gate_w.to(compute).t(), run @ up_w.to(compute).t()
                activated = F.silu(gate)
                hidden = activated * up
                expert_out = hidden @ down_w.to(compute).t()
                weights = slot_weights[start:start + length, None]
                # a copy before the in-place product: expert_out is kept for the weights' gradient
                out.index_add_(0, index, expert_out.to(out.dtype, copy=True).mul_(weights))
                saved += [run, gate, up, activated, hidden, expert_out]
                start += length
        ctx.lengths = lengths
        ctx.save_for_backward(slot_tokens, slot_weights, *matrices, *saved)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        lengths = ctx.lengths
        slot_tokens, slot_weights, *rest = ctx.saved_tensors
        matrices, saved = rest[:3 * len(lengths)], rest[3 * len(lengths):]
        need_tokens, _, need_weights = ctx.needs_input_grad[:3]
        compute = saved[0].dtype
        grad_tokens = torch.zeros(grad.shape, dtype=compute, device=grad.device) if need_tokens else None
        grad_weights = torch.empty_like(slot_weights) if need_weights else None
        grad_matrices: list[torch.Tensor] = []
        start = 0
        for e, length in enumerate(lengths):
            gate_w, up_w, down_w = matrices[3 * e:3 * e + 3]
            run, gate, up, activated, hidden, expert_out = saved[6 * e:6 * e + 6]
            index = slot_tokens[start:start + length]
            grad_run = grad.index_select(0, index)
            if grad_weights is not None:
                torch.sum(grad_run * expert_out.to(grad.dtype), dim=1, out=grad_weights[start:start + length])
            grad_expert_out = grad_run.mul_(slot_weights[start:start + length, None]).to(compute)
            grad_hidden = grad_expert_out @ down_w.to(compute)
            grad_down = grad_expert_out.t() @ hidden
            grad_up = grad_hidden * activated
            grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
            if grad_tokens is not None:
                grad_rows = torch.mm(grad_gate, gate_w.to(compute)).addmm_(grad_up, up_w.to(compute))
                grad_tokens.index_add_(0, index, grad_rows)
            grad_matrices += [(grad_gate.t() @ run).to(gate_w.dtype), (grad_up.t() @ run).to(up_w.dtype),
                              grad_down.to(down_w.dtype)]
            start += length
        return (grad_tokens, None, grad_weights, None, *grad_matrices)


def expert_runs(tokens: torch.Tensor, slot_tokens: torch.Tensor, slot_weights: torch.Tensor,
                lengths: list[int], experts) -> torch.Tensor:
    """Each expert's run of slots (``slot_tokens`` sorted by expert, ``lengths`` per expert)
    through its SwiGLU, weighted by ``slot_weights`` and summed per token: [N, d_model] in
    ``slot_weights``' dtype. ``experts``: the SwiGLU modules, one per run."""
    matrices = [m.weight for expert in experts for m in (expert.gate, expert.up, expert.down)]
    return _ExpertRunsFunction.apply(tokens, slot_tokens, slot_weights, lengths, *matrices)
