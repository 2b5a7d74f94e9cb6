"""Autoregressive sampling from the AR baseline, with a KV cache.

As in the release: the sequence starts with BOS and every next token is
argmax(log p + Gumbel noise), the noise drawn up front for all steps (float64 by default).
"""

from __future__ import annotations

import torch

from sampling.categorical import DTYPES


def gumbel_noise(shape, generator, device, gumbel_dtype: str = "float64") -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device, dtype=DTYPES[gumbel_dtype])
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


@torch.no_grad()
def ar_sample(model, batch_size: int, length: int, bos_index: int, generator=None,
              gumbel_dtype: str = "float64", use_cache: bool = True, noise=None):
    """Returns (tokens of shape (batch, length), NFE). ``use_cache=False`` recomputes the
    whole prefix at every step (the release's way; the same tokens under the same noise)."""
    device = next(model.parameters()).device
    backbone = model.backbone
    x = torch.full((batch_size, length), bos_index, dtype=torch.long, device=device)
    if noise is None:
        noise = gumbel_noise((batch_size, length - 1, model.vocab_size), generator, device,
                             gumbel_dtype)
    cache = backbone.new_cache() if use_cache else None
    for i in range(length - 1):
        if use_cache:
            logp = backbone.forward_cached(x[:, i:i + 1], cache)[:, -1]
        else:
            logp = backbone(x[:, : i + 1])[:, -1]
        x[:, i + 1] = (logp.to(noise.dtype) + noise[:, i]).argmax(-1)
    return x, length - 1
