"""Samplers over a model from the ``model`` package, one registry of predictors by name:
``ddpm``, ``ddpm_cache``, ``analytic``, the exact ``ddpm_fast`` and ``first_hitting``,
ordered unmasking (``confidence``, ``margin``, ``entropy``, ``random``) and ReMDM's
remasking samplers; semi-autoregressive windows over any of them, and AR with a KV cache.
Their settings are one :class:`Knobs` dataclass, built from ``sampling.*``.

A library: it takes a model and sizes, never a run config.
"""

from sampling.autoregressive import ar_sample
from sampling.categorical import sample_categorical
from sampling.diffusion import sample
from sampling.knobs import Knobs, SamplingError, check_model
from sampling.registry import PREDICTORS, load
from sampling.semi_ar import semi_ar_sample

load()

__all__ = ["PREDICTORS", "Knobs", "SamplingError", "ar_sample", "check_model", "sample",
           "sample_categorical", "semi_ar_sample"]
