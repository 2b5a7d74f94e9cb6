"""One registry of diffusion predictors over one shared sampling state.

A predictor is a function ``run(state)`` that takes the all-[MASK] (or prefixed) state to
its last step, registered by name with what it needs of the model. ``sampling.diffusion.
sample`` builds the state, calls the predictor and finishes with noise removal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sampling.categorical import sample_categorical
from sampling.knobs import Knobs
from sampling.warp import warp_probs


@dataclass(frozen=True)
class Predictor:
    name: str
    run: Callable
    parameterizations: tuple = ("subs", "d3pm", "sedd")
    needs_loglinear: bool = False  # steps by masking probability t (ddpm_cache's law)
    needs_time_free: bool = False  # reuses predictions across times
    always_denoise: bool = True  # the release's final greedy step, even with nothing masked
    analytic_denoise: bool = False  # SEDD's final Tweedie step instead of argmax


PREDICTORS: dict[str, Predictor] = {}


def register(name: str, **needs):
    def wrap(run):
        PREDICTORS[name] = Predictor(name, run, **needs)
        return run
    return wrap


def load() -> None:
    """Imports every module that registers predictors."""
    import sampling.diffusion  # noqa: F401
    import sampling.fast  # noqa: F401
    import sampling.first_hitting  # noqa: F401
    import sampling.ordered  # noqa: F401
    import sampling.remdm  # noqa: F401


class Counter:
    """Counts network calls (NFE)."""

    def __init__(self, model):
        self.model, self.nfe = model, 0

    def __call__(self, x, sigma):
        self.nfe += 1
        return self.model(x, sigma)


@dataclass
class State:
    """What every predictor works on: the tokens, the counted network, the knobs and the
    generator. ``fixed`` marks the positions given clean (a semi-AR prefix), which no
    predictor ever changes."""
    model: torch.nn.Module
    net: Counter
    x: torch.Tensor
    knobs: Knobs
    generator: torch.Generator | None
    fixed: torch.Tensor
    stop_after: int | None = None

    @property
    def mask_index(self) -> int:
        return self.model.mask_index

    @property
    def steps_to_run(self) -> int:
        steps = int(self.knobs.steps)
        return steps if self.stop_after is None else min(steps, self.stop_after)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        return sample_categorical(probs, self.generator, self.knobs.gumbel_dtype)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.model.noise(t)[0]

    def p_x0(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """p_theta(x0 | x) after temperature and nucleus (float64 when they act; exactly
        the network's exp(log p) otherwise)."""
        probs = self.net(x, sigma).exp()
        return warp_probs(probs, self.knobs) if self.knobs.warps else probs

    def timesteps(self) -> torch.Tensor:
        return torch.linspace(1, self.knobs.eps, int(self.knobs.steps) + 1,
                              device=self.x.device)

    @property
    def dt(self) -> float:
        return (1 - self.knobs.eps) / int(self.knobs.steps)

    def batch_times(self, value) -> torch.Tensor:
        return value * torch.ones(self.x.shape[0], device=self.x.device)
