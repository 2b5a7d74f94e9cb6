"""Noise schedules: total noise sigma(t) and its rate sigma'(t) for t in [0, 1].

A token stays itself with probability alpha_t = exp(-sigma(t)), otherwise it becomes [MASK].
Each schedule is a small stateless object: ``schedule(t)`` returns ``(sigma(t), sigma'(t))``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch

from model.errors import ConfigError


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def log_masking_bounds(schedule, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 - exp(-sigma)) at sigma_max and sigma_min, computed in float32 as the release
    does (its schedule constants are float32 tensors)."""
    sigma_max = torch.tensor(schedule.sigma_max, dtype=torch.float32)
    sigma_min = torch.tensor(schedule.sigma_min, dtype=torch.float32)
    f_T = torch.log1p(-torch.exp(-sigma_max))
    f_0 = torch.log1p(-torch.exp(-sigma_min))
    return f_T.to(like.device), f_0.to(like.device)


class NoiseSchedule(abc.ABC):
    name = "base"

    @abc.abstractmethod
    def total(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise sigma(t)."""

    @abc.abstractmethod
    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """Noise rate sigma'(t)."""

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.total(t), self.rate(t)

    def move_chance(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is masked at time t: 1 - exp(-sigma(t))."""
        return 1 - torch.exp(-self.total(t))

    @property
    def supports_importance_sampling(self) -> bool:
        return hasattr(self, "importance_sampling_transformation")


@dataclass(frozen=True)
class LogLinear(NoiseSchedule):
    """sigma(t) = -log(1 - (1 - eps) t): the masking probability is (1 - eps) t."""

    eps: float = 1e-3
    name = "loglinear"

    @property
    def sigma_max(self) -> float:
        return -math.log1p(-(1 - self.eps))

    @property
    def sigma_min(self) -> float:
        # As in the reference implementation: eps + sigma(0).
        return self.eps

    def total(self, t):
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t):
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def importance_sampling_transformation(self, t):
        f_T, f_0 = log_masking_bounds(self, t)
        sigma_t = -torch.log1p(-torch.exp(t * f_T + (1 - t) * f_0))
        return -torch.expm1(-sigma_t) / (1 - self.eps)


@dataclass(frozen=True)
class Linear(NoiseSchedule):
    """sigma(t) = sigma_min + t (sigma_max - sigma_min)."""

    sigma_min: float = 1e-3
    sigma_max: float = 7.0
    name = "linear"

    def total(self, t):
        return self.sigma_min + t * (self.sigma_max - self.sigma_min)

    def rate(self, t):
        return torch.full_like(t, self.sigma_max - self.sigma_min)

    def importance_sampling_transformation(self, t):
        f_T, f_0 = log_masking_bounds(self, t)
        sigma_t = -torch.log1p(-torch.exp(t * f_T + (1 - t) * f_0))
        return (sigma_t - self.sigma_min) / (self.sigma_max - self.sigma_min)


@dataclass(frozen=True)
class Geometric(NoiseSchedule):
    """sigma(t) = sigma_min^(1 - t) sigma_max^t."""

    sigma_min: float = 1e-3
    sigma_max: float = 1.0
    name = "geometric"

    def total(self, t):
        return _const(self.sigma_min, t) ** (1 - t) * _const(self.sigma_max, t) ** t

    def rate(self, t):
        return self.total(t) * (math.log(self.sigma_max) - math.log(self.sigma_min))


@dataclass(frozen=True)
class Cosine(NoiseSchedule):
    """sigma(t) = -log(eps + (1 - eps) cos(pi t / 2))."""

    eps: float = 1e-3
    name = "cosine"

    def total(self, t):
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * math.pi / 2))

    def rate(self, t):
        cos = (1 - self.eps) * torch.cos(t * math.pi / 2)
        sin = (1 - self.eps) * torch.sin(t * math.pi / 2)
        return (math.pi / 2) * sin / (cos + self.eps)


@dataclass(frozen=True)
class CosineSqr(NoiseSchedule):
    """sigma(t) = -log(eps + (1 - eps) cos^2(pi t / 2))."""

    eps: float = 1e-3
    name = "cosinesqr"

    def total(self, t):
        return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * math.pi / 2) ** 2)

    def rate(self, t):
        cos = (1 - self.eps) * torch.cos(t * math.pi / 2) ** 2
        sin = (1 - self.eps) * torch.sin(t * math.pi)
        return (math.pi / 2) * sin / (cos + self.eps)


SCHEDULES = {
    "loglinear": lambda c: LogLinear(eps=c.get("eps", 1e-3)),
    "linear": lambda c: Linear(c.get("sigma_min", 1e-3), c.get("sigma_max", 7.0)),
    "geometric": lambda c: Geometric(c.get("sigma_min", 1e-3), c.get("sigma_max", 1.0)),
    "cosine": lambda c: Cosine(eps=c.get("eps", 1e-3)),
    "cosinesqr": lambda c: CosineSqr(eps=c.get("eps", 1e-3)),
}


def get_noise(noise: dict) -> NoiseSchedule:
    """Builds a schedule from a mapping with ``type`` and its parameters (the ``noise`` group)."""
    kind = noise.get("type", "loglinear")
    if kind not in SCHEDULES:
        raise ConfigError(
            f"noise.type={kind!r} is not a known schedule; use one of {sorted(SCHEDULES)}."
        )
    return SCHEDULES[kind](noise)
