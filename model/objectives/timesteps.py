"""Sampling of diffusion times and of the noised input x_t."""

from __future__ import annotations

import torch


def sample_t(n: int, device, sampling_eps: float = 1e-3, antithetic: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """t = eps + (1 - eps) u; antithetic: element i takes u = (r_i / n + i / n) mod 1."""
    u = torch.rand(n, device=device, generator=generator)
    if antithetic:
        offset = torch.arange(n, device=device) / n
        u = (u / n + offset) % 1
    return (1 - sampling_eps) * u + sampling_eps


def discretize(t: torch.Tensor, T: int) -> torch.Tensor:
    """Rounds t in [0, 1) onto the grid {1/T, ..., 1} as the discrete-time bound needs."""
    return (t * T).to(torch.int) / T + 1 / T


def q_xt(x0: torch.Tensor, move_chance: torch.Tensor, mask_index: int,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Masks each token of x0 independently with probability ``move_chance`` (batch, 1)."""
    move = torch.rand(*x0.shape, device=x0.device, generator=generator) < move_chance
    return torch.where(move, mask_index, x0)
