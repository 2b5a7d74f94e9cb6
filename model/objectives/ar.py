"""Autoregressive next-token cross entropy."""

from __future__ import annotations

import torch

from model.objectives.subs import logsumexp_without


def ar_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(x_{i+1} | x_{<=i}) per position; ``log_probs`` from the causal network."""
    return -torch.gather(log_probs, -1, targets[:, :, None]).squeeze(-1)


def ar_rows(logits: torch.Tensor, targets: torch.Tensor, mask_index: int) -> torch.Tensor:
    """Next-token cross entropy from (k, vocab) raw logits -> (k,), with no mass on [MASK]
    (the causal network's -1000 logit there has probability exactly 0 in float32)."""
    lse = logsumexp_without(logits, mask_index)
    return lse - logits.gather(-1, targets[:, None]).squeeze(-1)
