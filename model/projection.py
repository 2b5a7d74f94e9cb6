"""The output projection onto the vocabulary, and losses computed through it in chunks.

``Projection`` is an ``nn.Linear`` (same parameters and state-dict keys) whose forward can
also take a per-row loss: then the hidden states of the selected rows (k, hidden) are
projected and scored ``chunk_rows`` rows at a time, so that at most one chunk of
(chunk_rows, vocab) logits exists at once. When gradients are needed, each chunk's
gradients with respect to its hidden rows, the weight and the bias are computed right
there (``torch.autograd.grad`` on the chunk alone) and kept; backward only scales them by
the incoming gradient. Nothing is recomputed and no logits survive the forward.

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

RowLoss = Callable[..., torch.Tensor]  # (logits (n, vocab) float32, *aux rows) -> (n,)


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _chunk_logits(h, weight, bias, dtype):
    """Float32 logits of one chunk, computed in ``dtype`` (the autocast dtype) when set, as
    ``nn.Linear`` under autocast computes them."""
    if dtype is not None:
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return F.linear(h, weight, bias).float()


def _leaf(param, dtype):
    """A detached copy of ``param`` in the compute dtype that gradients are taken against."""
    if param is None:
        return None
    return param.detach().to(dtype or param.dtype).requires_grad_(True)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def _losses_only(h, weight, bias, row_loss, aux, row_weights, chunk_rows, dtype):
    losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for part in _chunks(h.shape[0], chunk_rows):
        logits = _chunk_logits(h[part], weight, bias, dtype)
        losses[part] = row_loss(logits, *(a[part] for a in aux))
    return (losses * row_weights).sum(), losses


class _ProjectedLoss(torch.autograd.Function):
    """sum_i w_i loss_i(W h_i + b), with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, row_weights, row_loss, aux, chunk_rows, dtype):
        leaf_w, leaf_b = _leaf(weight, dtype), _leaf(bias, dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for part in _chunks(h.shape[0], chunk_rows):
            with torch.enable_grad():
                leaf_h = h[part].detach().requires_grad_(True)
                per_row = row_loss(_chunk_logits(leaf_h, leaf_w, leaf_b, dtype),
                                   *(a[part] for a in aux))
                inputs = (leaf_h, leaf_w) if leaf_b is None else (leaf_h, leaf_w, leaf_b)
                grads = torch.autograd.grad((per_row * row_weights[part]).sum(), inputs)
            losses[part] = per_row.detach()
            grad_h[part] = grads[0]
            grad_w += grads[1]
            if grad_b is not None:
                grad_b += grads[2]
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(losses)
        return (losses * row_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_total, grad_losses):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_total.to(grad_h.dtype)
        return (grad_h * scale, grad_w * scale.to(grad_w.dtype),
                None if grad_b is None else grad_b * scale.to(grad_b.dtype),
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
