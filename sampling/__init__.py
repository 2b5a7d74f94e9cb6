"""Samplers over a model from the ``model`` package: ``ddpm``, ``ddpm_cache``, ``analytic``,
the exact fast sampler ``ddpm_fast``, semi-autoregressive windows and AR with a KV cache.

A library: it takes a model and sizes, never a run config.
"""

from sampling.autoregressive import ar_sample
from sampling.categorical import sample_categorical
from sampling.diffusion import PREDICTORS, sample
from sampling.semi_ar import semi_ar_sample

__all__ = ["PREDICTORS", "ar_sample", "sample", "sample_categorical", "semi_ar_sample"]
