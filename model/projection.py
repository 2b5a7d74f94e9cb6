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
A compiled model (``Projection.compile_loss``) scores the cross entropy of each chunk with
one ``torch.compile``d function instead of eager passes over its float32 logits.
The loss handed back is the weighted sum over rows (a scalar that carries the gradient),
with the unweighted per-row losses beside it as plain values. Going through the module's
own ``__call__`` keeps ZeRO-3's parameter gathering hooks in play.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Logits per chunk when ``chunk_rows`` is 0 (auto): on the CPU 32M (128 MiB of float32: 667
# rows of GPT-2's 50,258; measured in benchmarks/bench_train.py, the speed of larger chunks
# at a fraction of their memory); on a GPU, whose matrix units want tall products, 128M
# (2,670 rows).
AUTO_CHUNK_LOGITS = {"cpu": 1 << 25, "cuda": 1 << 27}


# The training cross entropy pads the vocabulary to a multiple of this many rows on these
# devices: GPT-2's 50,258 rows leave the weight's rows 16-byte misaligned in bf16, and on
# an H100-class GPU cuBLAS then runs its three products per chunk with sm80 kernels at
# about 245 TFLOP/s (a sixth of a model=small step) instead of its Hopper kernels. The
# padded logits are -inf, so they get no probability and no gradient.
PAD_VOCAB_TO = {"cuda": 64}


def auto_chunk_rows(device: torch.device, vocab: int) -> int:
    budget = AUTO_CHUNK_LOGITS.get(device.type, AUTO_CHUNK_LOGITS["cuda"])
    return max(1, budget // max(vocab, 1))

# (logits (n, vocab) float32, *aux rows) -> (n,); differentiable, not in place
RowLoss = Callable[..., torch.Tensor]


def _compute_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``, or None when autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _cast(weight, bias, dtype):
    """Weight and bias in ``dtype`` (the autocast dtype), as ``nn.Linear`` under autocast
    casts them; unchanged when autocast is off."""
    if dtype is None:
        return weight, bias
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _cast_padded(weight, bias, dtype, multiple: int):
    """``_cast``, with zero rows appended up to a multiple of ``multiple`` rows: cast and
    padded in one copy."""
    extra = -weight.shape[0] % multiple
    if not extra:
        return _cast(weight, bias, dtype)
    vocab, dtype = weight.shape[0], dtype or weight.dtype
    padded = weight.new_zeros((vocab + extra, weight.shape[1]), dtype=dtype)
    padded[:vocab].copy_(weight)
    if bias is not None:
        bias = torch.cat([bias.to(dtype), bias.new_zeros(extra, dtype=dtype)])
    return padded, bias


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row. As a ``row_loss`` the chunked projection
    recognises it and takes its gradient, softmax - one-hot, in place in the logits'
    own buffer: one (chunk_rows, vocab) tensor per chunk instead of three."""
    return F.cross_entropy(logits, targets, reduction="none")


def _cross_entropy_in_place(logits, targets, weights):
    """(per-row cross entropy, d(sum_i w_i loss_i)/d logits = w softmax - w one-hot), both
    computed in the logits' own buffer, which ends up holding the gradient."""
    picked = logits.gather(1, targets[:, None])[:, 0]
    top = logits.amax(dim=-1, keepdim=True)
    total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
    losses = (top + total.log())[:, 0] - picked
    grad = logits.mul_(weights[:, None] / total)
    grad.scatter_add_(1, targets[:, None], -weights[:, None].to(grad.dtype))
    return losses, grad


def cross_entropy_and_gradient(logits, targets, weights, vocab: int, fill_column: int,
                               fill_value: float):
    """What ``_cross_entropy_in_place`` computes, written for ``torch.compile`` to fuse:
    logits (n, padded vocab) in the compute dtype; column ``fill_column`` (-1: none) set to
    ``fill_value`` and the columns from ``vocab`` on excluded, all in registers. Returns
    (float32 per-row losses, d(sum_i w_i loss_i)/d logits in the logits' dtype): compiled,
    two reads of the logits and one write of the gradient, where the eager version's cast,
    fills and in-place passes move the chunk's float32 logits about eight times."""
    column = torch.arange(logits.shape[1], device=logits.device)
    x = torch.where(column == fill_column, fill_value, logits.float())
    x = torch.where(column < vocab, x, -torch.inf)
    top = x.amax(dim=1, keepdim=True)
    exp = torch.exp(x - top)
    total = exp.sum(dim=1, keepdim=True)
    losses = (top + total.log() - x.gather(1, targets[:, None]))[:, 0]
    w = weights[:, None]
    grad = exp * (w / total) - torch.where(column == targets[:, None], w, 0.0)
    return losses, grad.to(logits.dtype)


_compiled_cross_entropy = None


def _fused_cross_entropy(*args):
    """``cross_entropy_and_gradient`` through ``torch.compile`` (built on first use; one
    graph for every chunk size)."""
    global _compiled_cross_entropy
    if _compiled_cross_entropy is None:
        _compiled_cross_entropy = torch.compile(cross_entropy_and_gradient, dynamic=True)
    return _compiled_cross_entropy(*args)


def _chunk_logits(h_part, w, b, fill):
    """Float32 logits of one chunk, with ``fill`` = (column, value) written in place (the
    [MASK] logit the network never predicts)."""
    logits = F.linear(h_part, w, b).float()
    if fill is not None:
        logits[:, fill[0]] = fill[1]
    return logits


@torch.no_grad()
def _losses_only(h, weight, bias, row_loss, aux, row_weights, chunk_rows, dtype, fill):
    losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    weight, bias = _cast(weight, bias, dtype)
    for part in _chunks(h.shape[0], chunk_rows):
        h_part = h[part] if dtype is None else h[part].to(dtype)
        # evaluation keeps the log-softmax kernel's arithmetic: a perplexity equals the one
        # computed from the network's full log-probabilities
        losses[part] = row_loss(_chunk_logits(h_part, weight, bias, fill),
                                *(a[part] for a in aux))
    return (losses * row_weights).sum(), losses


_ADDS_INTO_FLOAT32: dict[str, bool] = {}


def _adds_into_float32(device: torch.device) -> bool:
    """Whether this device's ``torch.addmm`` takes ``out_dtype``: a bf16/fp16 product added
    into a float32 matrix by the GEMM itself (CUDA), instead of a rounded low-precision
    product cast and added in two more passes. Asked once per device type."""
    if device.type not in _ADDS_INTO_FLOAT32:
        try:
            a = torch.ones(2, 3, dtype=torch.bfloat16, device=device)
            out = torch.addmm(torch.ones(2, 2, device=device), a, a.t(),
                              out_dtype=torch.float32)
            works = out.dtype == torch.float32 and bool((out == 4).all())
        except (RuntimeError, TypeError, NotImplementedError):
            works = False
        _ADDS_INTO_FLOAT32[device.type] = works
    return _ADDS_INTO_FLOAT32[device.type]


def _accumulate(grad_h, grad_w, grad_b, part, g, w, b, h_part):
    """The projection's backward for one chunk, from the gradient ``g`` of its logits:
    its rows of ``grad_h`` written, its float32 weight and bias gradients added (the first
    chunk's start them). Returns (grad_w, grad_b)."""
    g_part = g.to(w.dtype)
    grad_h[part] = g_part @ w
    if grad_w is None:
        if w.dtype != torch.float32 and _adds_into_float32(w.device):
            grad_w = torch.mm(g_part.t(), h_part, out_dtype=torch.float32)
        else:
            grad_w = (g_part.t() @ h_part).float()
        return grad_w, None if b is None else g.sum(0, dtype=torch.float32)
    if w.dtype == torch.float32:
        grad_w.addmm_(g_part.t(), h_part)
    elif _adds_into_float32(w.device):  # one product, accumulated in float32 by the GEMM
        grad_w = torch.addmm(grad_w, g_part.t(), h_part, out_dtype=torch.float32)
    else:
        grad_w += (g_part.t() @ h_part).float()
    if grad_b is not None:
        grad_b += g.sum(0, dtype=torch.float32)
    return grad_w, grad_b


class _ProjectedLoss(torch.autograd.Function):
    """sum_i w_i loss_i(W h_i + b), with the gradients computed chunk by chunk in forward:
    autograd only through the row loss (d loss / d logits of the chunk), then the
    projection's backward by hand, accumulated into one float32 weight gradient (in place
    for float32 weights; on CUDA a low-precision chunk product is added by the GEMM in
    float32, elsewhere rounded and then added).

    A filled column's gradient is taken after the fill: the filled logits have probability
    0, so it is 0, as the derivative through the fill itself is."""

    @staticmethod
    def forward(ctx, h, weight, bias, row_weights, row_loss, aux, chunk_rows, dtype, fill,
                fused):
        vocab = weight.shape[0]
        fused = fused and row_loss is cross_entropy_rows
        multiple = PAD_VOCAB_TO.get(h.device.type, 1) if row_loss is cross_entropy_rows else 1
        w, b = _cast_padded(weight.detach(), None if bias is None else bias.detach(), dtype,
                            multiple)
        grad_h = torch.empty_like(h)
        grad_w = grad_b = None
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for part in _chunks(h.shape[0], chunk_rows):
            h_part = h[part].detach() if dtype is None else h[part].detach().to(dtype)
            if fused:
                per_row, g = _fused_cross_entropy(
                    F.linear(h_part, w, b), aux[0][part], row_weights[part], vocab,
                    -1 if fill is None else fill[0], 0.0 if fill is None else fill[1])
                losses[part] = per_row
                grad_w, grad_b = _accumulate(grad_h, grad_w, grad_b, part, g, w, b, h_part)
                continue
            logits = _chunk_logits(h_part, w, b, fill)
            if w.shape[0] > vocab:  # padding rows: no probability, no gradient
                logits[:, vocab:] = -torch.inf
            if row_loss is cross_entropy_rows:
                per_row, g = _cross_entropy_in_place(logits, aux[0][part], row_weights[part])
            else:
                logits.requires_grad_(True)
                with torch.enable_grad():
                    per_row = row_loss(logits, *(a[part] for a in aux))
                    (g,) = torch.autograd.grad((per_row * row_weights[part]).sum(), logits)
            losses[part] = per_row.detach()
            del logits, per_row
            grad_w, grad_b = _accumulate(grad_h, grad_w, grad_b, part, g, w, b, h_part)
        if grad_w is None:  # no rows
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
            grad_b = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        elif grad_w.shape[0] > vocab:
            grad_w = grad_w[:vocab]
            grad_b = None if grad_b is None else grad_b[:vocab]
        # Kept on ctx (not saved tensors) so backward can scale them in place, once; in
        # float32 until scaled (a loss-scaled fp16 or a bf16 weight is rounded only then).
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(losses)
        return (losses * row_weights).sum(), losses

    @staticmethod
    def backward(ctx, grad_total, grad_losses):
        if ctx.grads is None:
            raise RuntimeError("the chunked projection's gradients were already used; it "
                               "supports one backward pass (no retain_graph).")
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad_total.to(g.dtype)).to(dtype)
                  for g, dtype in zip(grads, ctx.dtypes)]
        return (*scaled, None, None, None, None, None, None, None)


class Projection(nn.Linear):
    """``nn.Linear`` onto the vocabulary. Called as ``proj(h)`` it returns logits;
    called as ``proj(h, row_loss=f, aux=(...), row_weights=w)`` with ``h`` of shape (k,
    hidden) it returns ``(sum_i w_i f_i, f)`` where ``f_i = row_loss(logits_i, aux_i)``
    (``fill`` = (column, value) first sets that logit of every row), never holding more
    than ``chunk_rows`` rows of logits (0: ``auto_chunk_rows``; float32, computed in the
    autocast dtype when autocast is on, as the plain projection is).

    After ``compile_loss()`` a cross entropy (``cross_entropy_rows``) with gradients is
    scored by ``cross_entropy_and_gradient`` compiled: the model compiles it with its
    blocks."""

    fused_loss = False

    def compile_loss(self) -> None:
        self.fused_loss = True

    def forward(self, h: torch.Tensor, row_loss: RowLoss | None = None, aux: tuple = (),
                row_weights: torch.Tensor | None = None, chunk_rows: int = 0,
                fill: tuple[int, float] | None = None):
        if row_loss is None:
            return super().forward(h)
        dtype = _compute_dtype(h.device)
        if row_weights is None:
            row_weights = torch.ones(h.shape[0], dtype=torch.float32, device=h.device)
        elif row_weights.requires_grad:
            raise ValueError("row_weights must not require gradients: the chunked loss "
                             "treats them as constants.")
        chunk_rows = int(chunk_rows) or auto_chunk_rows(h.device, self.out_features)
        needs_grad = torch.is_grad_enabled() and (
            h.requires_grad or any(p.requires_grad for p in self.parameters()))
        with torch.autocast(device_type=h.device.type, enabled=False):
            if not needs_grad:
                return _losses_only(h, self.weight, self.bias, row_loss, tuple(aux),
                                    row_weights, chunk_rows, dtype, fill)
            return _ProjectedLoss.apply(h, self.weight, self.bias, row_weights, row_loss,
                                        tuple(aux), chunk_rows, dtype, fill, self.fused_loss)
