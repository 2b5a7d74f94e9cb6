"""SUBS parameterization and the continuous-time MDLM bound."""

from __future__ import annotations

import torch

# The finite "minus infinity" of the reference implementation: exp() of it is exactly 0 in
# float32 while sums and products with it stay finite.
NEG_INFINITY = -1_000_000.0


def subs_parameterization(logits: torch.Tensor, xt: torch.Tensor, mask_index: int) -> torch.Tensor:
    """Log-probabilities over x0: [MASK] never predicted; unmasked inputs carried over exactly.

    Works in place on ``logits`` (float32, as the backbone returns it).
    """
    logits[:, :, mask_index] += NEG_INFINITY
    logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    unmasked = xt != mask_index
    logits[unmasked] = NEG_INFINITY
    logits[unmasked, xt[unmasked]] = 0
    return logits


def subs_loss(log_p: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
              dsigma: torch.Tensor) -> torch.Tensor:
    """Per-token weight sigma'(t) / (exp(sigma(t)) - 1) times -log p_theta(x0 | xt).

    Unmasked positions contribute exactly 0 (SUBS gives them log-probability 0).
    ``sigma`` and ``dsigma`` have shape (batch,).
    """
    log_p_x0 = torch.gather(log_p, -1, x0[:, :, None]).squeeze(-1)
    return -log_p_x0 * (dsigma / torch.expm1(sigma))[:, None]


def subs_loss_reweighted(log_p: torch.Tensor, x0: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """The loss under importance sampling or change of variables: the weight becomes the
    constant -log(1 - exp(-sigma_min)) (the Jacobian of the time transformation)."""
    log_p_x0 = torch.gather(log_p, -1, x0[:, :, None]).squeeze(-1)
    weight = torch.log1p(-torch.exp(-torch.as_tensor(sigma_min, dtype=log_p.dtype)))
    return log_p_x0 * weight.to(log_p.device)
