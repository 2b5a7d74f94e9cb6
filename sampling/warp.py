"""Temperature and nucleus (top-p) on p_theta(x0 | x_t), in float64, before any draw.

Temperature: p ** (1 / temperature), renormalised. Nucleus, as the ReMDM code applies it:
sort the tokens by probability, keep those whose cumulative probability is at most
``top_p`` (always the most probable one), renormalise. Rows are processed in chunks, so the
sort's temporaries stay bounded whatever the batch (the output is one float64 tensor).
"""

from __future__ import annotations

import torch

from sampling.categorical import rows_per_chunk


def _warp_rows(p: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Warped copies of the (rows, categories) float64 block ``p``."""
    if temperature != 1:
        top = p.amax(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        p = (p / top).pow_(1.0 / temperature)  # scaled first: no underflow to all zeros
        p /= p.sum(-1, keepdim=True)
    if top_p < 1:
        values, order = p.sort(dim=-1, descending=True)
        keep = values.cumsum(-1) <= top_p
        keep[..., 0] = True
        values = values * keep
        values /= values.sum(-1, keepdim=True)
        p = torch.zeros_like(p).scatter_(-1, order, values)
    return p


def warp(probs: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Float64 probabilities of ``probs`` (any shape, categories last) after temperature
    and nucleus; each row must have positive mass."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.empty(flat.shape, dtype=torch.float64, device=probs.device)
    step = rows_per_chunk(flat.shape[1])
    for start in range(0, flat.shape[0], step):
        out[start:start + step] = _warp_rows(flat[start:start + step].double(),
                                             temperature, top_p)
    return out.reshape(probs.shape)


def warp_probs(probs: torch.Tensor, knobs) -> torch.Tensor:
    return warp(probs, float(knobs.temperature), float(knobs.top_p))
