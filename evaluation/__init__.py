"""Test, zero-shot and generative perplexity over a model from the ``model`` package, and
MAUVE of generated texts.

A library: it takes a model and data (or texts), never a run config.
"""

from evaluation.genppl import generative_perplexity, load_judge, unigram_entropy
from evaluation.mauve import mauve_score
from evaluation.perplexity import perplexity, shard_batches
from evaluation.tables import zero_shot_markdown

__all__ = ["generative_perplexity", "load_judge", "mauve_score", "perplexity", "shard_batches",
           "unigram_entropy", "zero_shot_markdown"]
