"""Autoregressive next-token cross entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ar_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(x_{i+1} | x_{<=i}) per position; ``log_probs`` from the causal network."""
    return -torch.gather(log_probs, -1, targets[:, :, None]).squeeze(-1)


def ar_rows(logits: torch.Tensor, targets: torch.Tensor, mask_index: int,
            mask_logit: float) -> torch.Tensor:
    """Next-token cross entropy from (k, vocab) raw logits -> (k,), with the [MASK] logit
    set to ``mask_logit`` as the causal network does before its log-softmax."""
    logits[:, mask_index] = mask_logit
    return F.cross_entropy(logits, targets, reduction="none")
