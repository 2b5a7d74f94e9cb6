"""Samplers over a model from the ``model`` package (ddpm, ddpm_cache, analytic, semi-AR, AR).

A library: it takes a model and tensors, never a run config.
"""
