"""Autoregressive sampling from the AR baseline, with a KV cache.

As in the release: the sequence starts with BOS and every next token is
argmax(log p + Gumbel noise) (float64 noise by default). The release draws the noise of all
steps up front, batch x length x vocab values (26 GB in float64 for 64 samples of 1024
tokens); here each step draws its own batch x vocab block when it needs it: the same law,
and the memory of one step. A given ``noise`` tensor is used as it is.
"""

from __future__ import annotations

import torch

from sampling.categorical import DTYPES
from sampling.warp import warp


def gumbel_noise(shape, generator, device, gumbel_dtype: str = "float64") -> torch.Tensor:
    """Standard Gumbel noise -log(-log U), built in place in one buffer."""
    u = torch.rand(shape, generator=generator, device=device, dtype=DTYPES[gumbel_dtype])
    return u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()


@torch.no_grad()
def ar_sample(model, batch_size: int, length: int, bos_index: int, generator=None,
              gumbel_dtype: str = "float64", use_cache: bool = True, noise=None,
              temperature: float = 1.0, top_p: float = 1.0):
    """Returns (tokens of shape (batch, length), NFE). ``use_cache=False`` recomputes the
    whole prefix at every step (the release's way; the same tokens under the same noise).
    ``noise`` (batch, length - 1, vocab), when given, replaces the per-step draws."""
    device = next(model.parameters()).device
    backbone = model.backbone
    x = torch.full((batch_size, length), bos_index, dtype=torch.long, device=device)
    cache = backbone.new_cache() if use_cache else None
    for i in range(length - 1):
        if use_cache:
            logp = backbone.forward_cached(x[:, i:i + 1], cache)[:, -1]
        else:
            logp = backbone(x[:, : i + 1])[:, -1]
        step_noise = noise[:, i] if noise is not None else gumbel_noise(
            (batch_size, model.vocab_size), generator, device, gumbel_dtype)
        if temperature != 1 or top_p != 1:
            logp = warp(logp.double().exp(), temperature, top_p).log()
        x[:, i + 1] = (logp.to(step_noise.dtype) + step_noise).argmax(-1)
    return x, length - 1
