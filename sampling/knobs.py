"""The sampler's knobs: one dataclass built from ``sampling.*``, every value checked.

``Knobs.from_config(cfg.sampling)`` reads the run's settings (missing keys keep their
defaults) and checks each value; ``check_model`` checks the combinations a model rules out
(``first_hitting`` on a time-conditioned model, ``ddpm_cache`` under a cosine schedule).
Both raise :class:`SamplingError`, a user error: one sentence naming the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from model.errors import UserError

GUMBEL_DTYPES = ("float64", "float32")
UNMASK_SCHEDULES = ("linear", "cosine")
# the ReMDM paper's OpenWebText protocol (T = 1024, top_p = 0.9): eta of each sampler
REMDM_ETA = {"remdm-cap": 0.008, "remdm-rescale": 0.015, "remdm-loop": 0.02, "remdm-conf": 0.0}


class SamplingError(UserError):
    """A ``sampling.*`` value out of range, or a sampler the model cannot run."""


@dataclass(frozen=True)
class Knobs:
    predictor: str = "ddpm_cache"
    steps: int = 128
    noise_removal: bool = True
    eps: float = 1e-5  # the last time of the reverse process
    gumbel_dtype: str = "float64"
    top_p: float = 1.0  # nucleus on p_theta(x0 | x_t); 1 keeps every token
    temperature: float = 1.0  # p_theta ** (1 / temperature), renormalised
    # ordered unmasking (confidence, margin, entropy, random)
    unmask_schedule: str = "linear"
    order_temperature: float = 0.0  # scale of the Gumbel noise added to the scores
    confidence_threshold: float | None = None  # Fast-dLLM's parallel rule when set
    # ReMDM
    eta: float | None = None  # None: the paper's value for the sampler (REMDM_ETA)
    t_on: float = 0.55
    t_off: float = 0.05
    alpha_on: float = 0.9
    # block diffusion (parameterization=bd3lm): the clean prefix's keys and values kept
    # across blocks; samples cut at EOS or when their last 256 tokens' entropy collapses
    kv_cache: bool = True
    var_length: bool = False
    # windows and batches of a run
    semi_ar: bool = False
    stride_length: int = 1
    num_strides: int = 1
    num_sample_batches: int = 2

    @classmethod
    def from_config(cls, section) -> Knobs:
        """The knobs of a ``sampling:`` config section (an OmegaConf node or a dict)."""
        known = {f.name for f in fields(cls)}
        values = {k: section[k] for k in section if k in known and section[k] is not None}
        return cls(**values)

    def __post_init__(self):
        check(self)

    def replace(self, **changes) -> Knobs:
        return dataclasses.replace(self, **changes)

    @property
    def remdm_eta(self) -> float:
        return REMDM_ETA.get(self.predictor, 0.0) if self.eta is None else float(self.eta)

    @property
    def warps(self) -> bool:
        """Whether temperature or nucleus changes p_theta (at the defaults nothing is
        touched, so the draws are bit-for-bit those of plain sampling)."""
        return self.top_p != 1 or self.temperature != 1


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise SamplingError(message)


def _number(value, name: str, kind=float):
    """``value`` as an int or a finite float, or one sentence naming it."""
    try:
        if isinstance(value, bool) or (kind is int and float(value) != int(value)):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise SamplingError(f"sampling.{name}={value!r} is not {what}; set {what}.") from None
    _need(kind is int or math.isfinite(number), f"sampling.{name}={value} is not finite; "
          "set a finite number.")
    return number


def check(k: Knobs) -> None:
    """Every value in range, or a :class:`SamplingError` naming it."""
    from sampling.registry import PREDICTORS, load

    load()
    _need(str(k.predictor) in PREDICTORS,
          f"sampling.predictor={k.predictor} is not a sampler; use one of {sorted(PREDICTORS)}.")
    steps = _number(k.steps, "steps", int)
    _need(steps >= 1, f"sampling.steps={k.steps} must be at least 1; set a positive number "
          "of steps.")
    eps = _number(k.eps, "eps")
    _need(0 < eps < 1, f"sampling.eps={k.eps} must lie in (0, 1); the release uses 1e-5.")
    _need(str(k.gumbel_dtype) in GUMBEL_DTYPES, f"sampling.gumbel_dtype={k.gumbel_dtype} is "
          f"not one of {list(GUMBEL_DTYPES)}; use float64 (or float32 for the release's draws).")
    top_p = _number(k.top_p, "top_p")
    _need(0 < top_p <= 1, f"sampling.top_p={k.top_p} must lie in (0, 1]; 1 turns nucleus "
          "sampling off.")
    temperature = _number(k.temperature, "temperature")
    _need(temperature > 0, f"sampling.temperature={k.temperature} must be positive; 1 "
          "samples the model's own distribution.")
    _need(str(k.unmask_schedule) in UNMASK_SCHEDULES, f"sampling.unmask_schedule="
          f"{k.unmask_schedule} is not one of {list(UNMASK_SCHEDULES)}; use linear or cosine.")
    order = _number(k.order_temperature, "order_temperature")
    _need(order >= 0, f"sampling.order_temperature={k.order_temperature} must be at least 0 "
          "(0 unmasks in score order).")
    if k.confidence_threshold is not None:
        threshold = _number(k.confidence_threshold, "confidence_threshold")
        _need(0 < threshold <= 1, f"sampling.confidence_threshold={k.confidence_threshold} "
              "must lie in (0, 1]; set null to unmask on the schedule.")
    for name in ("t_on", "t_off", "alpha_on"):
        value = _number(getattr(k, name), name)
        _need(0 < value < 1, f"sampling.{name}={getattr(k, name)} must lie in (0, 1); "
              "the paper uses t_on=0.55, t_off=0.05, alpha_on=0.9.")
    _need(k.t_off < k.t_on, f"sampling.t_off={k.t_off} must be below sampling.t_on={k.t_on}; "
          "the paper uses t_on=0.55, t_off=0.05.")
    if k.eta is not None:
        _number(k.eta, "eta")
    _check_eta(k)
    for name in ("stride_length", "num_strides", "num_sample_batches"):
        value = _number(getattr(k, name), name, int)
        _need(value >= (1 if name == "stride_length" else 0),
              f"sampling.{name}={getattr(k, name)} must be at least "
              f"{1 if name == 'stride_length' else 0}; set a "
              f"{'positive' if name == 'stride_length' else 'non-negative'} whole number.")


def _check_eta(k: Knobs) -> None:
    eta = k.remdm_eta
    if k.predictor == "remdm-loop":
        bound = (1 - k.alpha_on) / k.alpha_on  # the unmasking probability stays within [0, 1]
        _need(0 <= eta <= bound, f"sampling.eta={eta} must lie in [0, (1 - alpha_on) / "
              f"alpha_on = {bound:.4g}] for remdm-loop; the paper uses 0.02.")
    elif k.predictor in ("remdm-cap", "remdm-rescale"):
        _need(0 <= eta <= 1, f"sampling.eta={eta} must lie in [0, 1] for {k.predictor}; the "
              f"paper uses {REMDM_ETA[k.predictor]}.")
    elif k.eta is not None:
        _need(0 <= eta <= 1, f"sampling.eta={eta} must lie in [0, 1].")


def check_model(k: Knobs, parameterization: str, time_conditioning: bool, noise: str,
                length: int | None = None) -> None:
    """The combinations a model rules out, checked from its settings alone (so a run can
    check them before it loads the checkpoint)."""
    from sampling.registry import PREDICTORS

    entry = PREDICTORS[k.predictor]
    fix = "use ddpm_cache or analytic"
    if parameterization == "ar":
        return
    if parameterization == "bd3lm":
        from sampling.blocks import PREDICTORS as BLOCK_PREDICTORS

        _need(k.predictor in BLOCK_PREDICTORS,
              f"sampling.predictor={k.predictor} does not sample block diffusion "
              f"(parameterization=bd3lm); use one of {list(BLOCK_PREDICTORS)}.")
        _need(not k.semi_ar, "sampling.semi_ar=True is for MDLM; block diffusion samples "
              "any length block by block: set model.length to the length wanted.")
        return
    kinds = " or ".join(p.upper() for p in entry.parameterizations)
    _need(parameterization in entry.parameterizations,
          f"sampling.predictor={k.predictor} samples {kinds} models (parameterization="
          f"{entry.parameterizations[0]}), not parameterization={parameterization}; {fix}.")
    _need(not (entry.needs_time_free and time_conditioning),
          f"sampling.predictor={k.predictor} needs a model without time conditioning (its "
          "prediction must not depend on t); use ddpm_cache, or time_conditioning=False.")
    _need(not entry.needs_loglinear or noise == "loglinear",
          f"sampling.predictor={k.predictor} needs noise=loglinear, not noise={noise}; "
          "use ddpm or analytic.")
    if k.semi_ar and length is not None:
        _need(0 < int(k.stride_length) < int(length),
              f"sampling.stride_length={k.stride_length} must lie in (0, model.length="
              f"{length}) for sampling.semi_ar=True.")
