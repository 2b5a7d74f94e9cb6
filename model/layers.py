"""Building blocks shared by the DiT and the causal transformer.

Module and parameter names follow the released MDLM networks, so their state dicts load
without renaming.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in float32 (outside autocast)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight[None, None, :]


class EmbeddingLayer(nn.Module):
    """Token embedding matrix (vocab x hidden), looked up with ``F.embedding``: the same
    rows as indexing the matrix, with the embedding backward (a sorted segment sum)
    instead of indexing's accumulating ``index_put``, whose CUDA kernel took 12% of a
    training step of model=small on an H100-class GPU."""

    def __init__(self, dim: int, vocab_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.embedding)


@functools.lru_cache(maxsize=32)
def timestep_frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """exp(-log(max_period) i / half) for i < half: computed on the CPU as the release does
    and copied to ``device`` once, not at every forward (sampler steps included). A cache
    rather than a buffer: the state dict keeps the release's keys, and a module cast to
    bf16/fp16 cannot round the frequencies. Built outside inference mode, so a first call
    under ``torch.inference_mode`` does not cache a tensor that training could not use."""
    with torch.inference_mode(False):
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32)
                          / half)
        return freqs.to(device=device)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of sigma (256 frequencies) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        args = t[:, None].float() * timestep_frequencies(dim // 2, max_period, t.device)[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # float32 like the release; in the weights' dtype when an engine keeps them in bf16
        embedding = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half layout, base 10000), cached per length."""

    def __init__(self, dim: int, base: float = 10_000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # kept for the release's state dict
        # the float32 values the angles use: a module cast to bf16 (DeepSpeed's bf16 engine)
        # rounds its buffers, and bf16 frequencies would turn far positions by radians
        self._inv_freq = inv_freq.clone()
        self._cache: tuple | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, device)
        if self._cache is None or self._cache[0] != key:
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self._inv_freq.to(device=device))
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = (key, emb.cos(), emb.sin())
        return self._cache[1], self._cache[2]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates q and k of a (batch, seq, 3, heads, head_dim) tensor; v is left unchanged.

    As the release's fused kernel does: cos/sin rounded to qkv's dtype, the rotation
    computed in float32 and rounded once.
    """
    with torch.autocast(device_type=qkv.device.type, enabled=False):
        q, k, v = qkv.unbind(2)
        return torch.stack((rotate(q, cos, sin), rotate(k, cos, sin), v), dim=2)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """q or k, (batch, seq, heads, head_dim), rotated as ``apply_rotary`` rotates them."""
    dtype = x.dtype
    cos = cos.to(dtype).float()[None, :, None, :]
    sin = sin.to(dtype).float()[None, :, None, :]
    x = x.float()
    return (x * cos + rotate_half(x) * sin).to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def mlp(dim: int, ratio: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, ratio * dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(ratio * dim, dim, bias=True),
    )


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for ``model.autocast`` on ``device`` (None: full precision)."""
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    if setting == "auto" and device.type == "cuda":
        return torch.bfloat16
    return None
