"""SEDD: log-score parameterization and the score-entropy loss (absorbing state)."""

from __future__ import annotations

import math

import torch


def sedd_parameterization(logits: torch.Tensor, xt: torch.Tensor,
                          sigma: torch.Tensor) -> torch.Tensor:
    """Log score: logits - log(exp(sigma) - 1) - log(V - 1), with the current token's entry 0."""
    shift = esigm1_log(sigma).to(logits.dtype)[:, None, None]
    logits = logits - shift - math.log(logits.shape[-1] - 1)
    return torch.scatter(logits, -1, xt[..., None], torch.zeros_like(logits[..., :1]))


def score_entropy(log_score: torch.Tensor, sigma: torch.Tensor, dsigma: torch.Tensor,
                  xt: torch.Tensor, x0: torch.Tensor, mask_index: int) -> torch.Tensor:
    """Per-token sigma'(t) (sum_{y != mask} s(y) - q log s(x0) + q (log q - 1)) at masked
    positions, q = 1 / (exp(sigma) - 1); zero elsewhere. ``sigma``, ``dsigma``: (batch,)."""
    masked = xt == mask_index
    q_ratio = (1 / torch.expm1(sigma))[:, None].expand_as(xt)[masked]
    scores = log_score[masked]
    neg_term = q_ratio * torch.gather(scores, -1, x0[masked][..., None]).squeeze(-1)
    score = scores.exp()
    pos_term = score[:, :mask_index].sum(-1) + score[:, mask_index + 1:].sum(-1)
    const = q_ratio * (q_ratio.log() - 1)
    entropy = torch.zeros(*xt.shape, device=xt.device, dtype=log_score.dtype)
    entropy[masked] = pos_term - neg_term + const
    return dsigma[:, None] * entropy


def esigm1_log(sigma: torch.Tensor) -> torch.Tensor:
    """log(exp(sigma) - 1), accurate for small sigma."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log()


def score_entropy_rows(logits: torch.Tensor, x0: torch.Tensor, log_esigm1: torch.Tensor,
                       q_ratio: torch.Tensor, mask_index: int) -> torch.Tensor:
    """Score entropy at masked positions only, without the sigma'(t) factor: (k, vocab) raw
    logits, their targets, log(exp(sigma) - 1) and q = 1 / (exp(sigma) - 1) -> (k,). The
    [MASK] entry of the log score (the current token's) is 0 and leaves the positive term
    out."""
    log_score = logits - log_esigm1[:, None] - math.log(logits.shape[-1] - 1)
    score = log_score.exp()
    pos_term = score[:, :mask_index].sum(-1) + score[:, mask_index + 1:].sum(-1)
    neg_term = q_ratio * torch.gather(log_score, -1, x0[:, None]).squeeze(-1)
    return pos_term - neg_term + q_ratio * (q_ratio.log() - 1)
