"""Test, zero-shot and generative perplexity over a model from the ``model`` package.

A library: it takes a model and data loaders, never a run config.
"""
