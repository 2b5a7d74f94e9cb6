"""Categorical draws by the Gumbel-max trick, on unnormalised probabilities."""

from __future__ import annotations

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def sample_categorical(probs: torch.Tensor, generator=None,
                       gumbel_dtype: str = "float64") -> torch.Tensor:
    """argmax(probs / E) with E = 1e-10 - log(U + 1e-10): the release's draw. Float64 noise
    by default (float32 noise measurably lowers sample diversity); ``float32`` reproduces
    the release's draws."""
    dtype = DTYPES[gumbel_dtype]
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=dtype)
    gumbel_norm = 1e-10 - (u + 1e-10).log()
    return (probs.to(dtype) / gumbel_norm).argmax(dim=-1)
