"""Autoregressive next-token cross entropy."""

from __future__ import annotations

import torch

from model.projection import cross_entropy_rows


def ar_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(x_{i+1} | x_{<=i}) per position; ``log_probs`` from the causal network."""
    return -torch.gather(log_probs, -1, targets[:, :, None]).squeeze(-1)


# next-token cross entropy from (k, vocab) raw logits whose [MASK] logit was set as the
# causal network sets it -> (k,)
ar_rows = cross_entropy_rows
