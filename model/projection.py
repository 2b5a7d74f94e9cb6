"""The output projection onto the vocabulary, and losses computed through it in chunks.

``Projection`` is an ``nn.Linear`` (same parameters and state-dict keys) whose forward can
also take a per-row loss: then the hidden states of the selected rows (k, hidden) are
projected and scored ``chunk_rows`` rows at a time, so that at most one chunk of
(chunk_rows, vocab) logits exists at once. When gradients are needed, each chunk's
gradients with respect to its hidden rows, the weight and the bias are computed right
there (autograd through the row loss alone, the projection's backward by hand, accumulated
in place) and kept; backward only scales them by the incoming gradient. Nothing is
recomputed and no logits survive the forward.

That is the scheme of fused linear cross-entropy kernels, in PyTorch and for any row loss.
The loss handed back is the weighted sum over rows (a scalar that carries the gradient),
with the unweighted per-row losses beside it as plain values. Going through the module's
own ``__call__`` keeps ZeRO-3's parameter gathering hooks in play.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Logits per chunk when ``chunk_rows`` is 0 (auto): on the CPU, where every pass over them
# is a pass over memory, 16M (64 MiB of float32: 333 rows of GPT-2's 50,258); on a GPU,
# whose matrix units want tall products, 128M (2,670 rows).
AUTO_CHUNK_LOGITS = {"cpu": 1 << 24, "cuda": 1 << 27}


def auto_chunk_rows(device: torch.device, vocab: int) -> int:
    budget = AUTO_CHUNK_LOGITS.get(device.type, AUTO_CHUNK_LOGITS["cuda"])
    return max(1, budget // max(vocab, 1))

# (logits (n, vocab) float32, *aux rows) -> (n,); must not modify the logits in place
RowLoss = Callable[..., torch.Tensor]


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _cast(h, weight, bias, dtype):
    """The operands in ``dtype`` (the autocast dtype), as ``nn.Linear`` under autocast
    casts them; unchanged when autocast is off."""
    if dtype is None:
        return h, weight, bias
    return h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def _losses_only(h, weight, bias, row_loss, aux, row_weights, chunk_rows, dtype):
    losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    _, weight, bias = _cast(h[:0], weight, bias, dtype)
    for part in _chunks(h.shape[0], chunk_rows):
        h_part = h[part] if dtype is None else h[part].to(dtype)
        losses[part] = row_loss(F.linear(h_part, weight, bias).float(), *(a[part] for a in aux))
    return (losses * row_weights).sum(), losses


class _ProjectedLoss(torch.autograd.Function):
    """sum_i w_i loss_i(W h_i + b), with the gradients computed chunk by chunk in forward:
    autograd only through the row loss (d loss / d logits of the chunk), then the
    projection's backward by hand, accumulated in place (no weight-sized temporaries)."""

    @staticmethod
    def forward(ctx, h, weight, bias, row_weights, row_loss, aux, chunk_rows, dtype):
        _, w, b = _cast(h[:0], weight.detach(), None if bias is None else bias.detach(), dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for part in _chunks(h.shape[0], chunk_rows):
            h_part = h[part].detach() if dtype is None else h[part].detach().to(dtype)
            logits = F.linear(h_part, w, b).float().requires_grad_(True)
            with torch.enable_grad():
                per_row = row_loss(logits, *(a[part] for a in aux))
                (g,) = torch.autograd.grad((per_row * row_weights[part]).sum(), logits)
            losses[part] = per_row.detach()
            g_part = g.to(w.dtype)
            grad_h[part] = g_part @ w
            if w.dtype == torch.float32:
                grad_w.addmm_(g_part.t(), h_part)
            else:
                grad_w += (g_part.t() @ h_part).float()
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(losses)
        return (losses * row_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_total, grad_losses):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_total.to(grad_h.dtype), grad_w * grad_total.to(grad_w.dtype),
                None if grad_b is None else grad_b * grad_total.to(grad_b.dtype),
                None, None, None, None, None)


class Projection(nn.Linear):
    """``nn.Linear`` onto the vocabulary. Called as ``proj(h)`` it returns logits;
    called as ``proj(h, row_loss=f, aux=(...), row_weights=w)`` with ``h`` of shape (k,
    hidden) it returns ``(sum_i w_i f_i, f)`` where ``f_i = row_loss(logits_i, aux_i)``,
    never holding more than ``chunk_rows`` rows of logits (0: ``auto_chunk_rows``; float32,
    computed in the autocast dtype when autocast is on, as the plain projection is)."""

    def forward(self, h: torch.Tensor, row_loss: RowLoss | None = None, aux: tuple = (),
                row_weights: torch.Tensor | None = None, chunk_rows: int = 0):
        if row_loss is None:
            return super().forward(h)
        dtype = _compute_dtype(h.device)
        if row_weights is None:
            row_weights = torch.ones(h.shape[0], dtype=torch.float32, device=h.device)
        chunk_rows = int(chunk_rows) or auto_chunk_rows(h.device, self.out_features)
        needs_grad = torch.is_grad_enabled() and (
            h.requires_grad or any(p.requires_grad for p in self.parameters()))
        with torch.autocast(device_type=h.device.type, enabled=False):
            if not needs_grad:
                return _losses_only(h, self.weight, self.bias, row_loss, tuple(aux),
                                    row_weights, chunk_rows, dtype)
            return _ProjectedLoss.apply(h, self.weight, self.bias, row_weights, row_loss,
                                        tuple(aux), chunk_rows, dtype)
