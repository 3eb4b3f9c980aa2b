"""The LM head and the cross-entropy loss in one pass over row chunks (``model.fused_cross_entropy``).

The plain loss materialises fp32 logits [tokens, vocab], their log-softmax and, in backward, the
gradient of both — several passes over the largest activation of a small model. Here each chunk
of rows gets its logits, loss and gradient (``softmax - one_hot``, divided by the number of
targets) at once, the gradients of the hidden states and of the head's weight are accumulated
from it, and the chunk's logits are dropped: the work is the same three matmuls, the memory
traffic a chunk that stays in cache. The gradients are computed in forward and handed back in
backward, so this is for training steps (the model uses it only when gradients are on).
Padded vocabulary rows take part in the softmax exactly as in the plain loss. With a soft cap
(``model.logit_softcap``) the logits are ``cap * tanh(h @ W.T / cap)`` and the gradient passes
through the tanh (times ``1 - tanh²``), as autograd would take it through the plain loss.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class LinearCrossEntropy(torch.autograd.Function):
    """``mean over targets != -100 of cross_entropy(hidden @ weight.T, targets)``, in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_rows: int, softcap: float | None = None) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        safe_targets = targets.clamp(min=0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # out= and in-place matmuls are outside autocast: only where no autocast would apply anyway
        in_place = (hidden.dtype == weight.dtype == torch.float32 and grad_hidden.is_contiguous()
                    and not torch.is_autocast_enabled(hidden.device.type))
        for start in range(0, targets.numel(), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, keep = hidden[rows], safe_targets[rows], valid[rows]
            logits = (h @ weight.t()).float()
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            # One exp over the chunk serves the loss and the gradient: the shifted exponentials,
            # their row sums, then softmax = exp / sum in place (logsumexp + a second exp would
            # pass over the [rows, vocab] fp32 chunk twice more).
            picked = logits.gather(1, t[:, None]).squeeze(1)
            row_max = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(row_max).exp_()
            row_sum = grad.sum(dim=-1)
            total += ((row_sum.log() + row_max.squeeze(1) - picked) * keep).sum()
            grad.mul_((keep / (row_sum * count))[:, None])                 # softmax / count, 0 on ignored rows
            grad[torch.arange(t.numel(), device=t.device), t] -= keep / count
            if softcap is not None:
                grad.mul_(1.0 - capped.square_())
            if in_place:
                # fp32: the matmuls write and accumulate in place (no product copied, no extra add)
                torch.mm(grad, weight, out=grad_hidden[rows])
                grad_weight.addmm_(grad.t(), h)
            else:
                grad_hidden[rows] = (grad.to(h.dtype) @ weight).to(hidden.dtype)
                grad_weight += grad.t().to(h.dtype) @ h
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = 512, softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden`` [..., d] through the head ``weight`` [vocab, d] against
    ``targets`` [...] (-100: ignored), without keeping the logits; ``softcap``: logits capped by
    ``softcap * tanh(logits / softcap)``."""
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_rows,
                                    softcap)
