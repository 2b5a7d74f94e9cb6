"""SUBS parameterization and the continuous-time MDLM bound."""

from __future__ import annotations

import torch

from model.projection import cross_entropy_rows

# The finite "minus infinity" of the reference implementation: exp() of it is exactly 0 in
# float32 while sums and products with it stay finite.
NEG_INFINITY = -1_000_000.0


def subs_parameterization(logits: torch.Tensor, xt: torch.Tensor, mask_index: int) -> torch.Tensor:
    """Log-probabilities over x0: [MASK] never predicted; unmasked inputs carried over exactly.

    Works in place on ``logits`` (float32, as the backbone returns it), with masks and
    scatters rather than boolean indexing, so it never waits on the device.
    """
    logits[:, :, mask_index] += NEG_INFINITY
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    log_p = logits - lse
    unmasked = (xt != mask_index)[..., None]
    own = torch.where(unmasked, 0.0, torch.gather(logits, -1, xt[..., None]) - lse)
    log_p.masked_fill_(unmasked, NEG_INFINITY)
    return log_p.scatter_(-1, xt[..., None], own)


def subs_loss(log_p: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
              dsigma: torch.Tensor) -> torch.Tensor:
    """Per-token weight sigma'(t) / (exp(sigma(t)) - 1) times -log p_theta(x0 | xt).

    Unmasked positions contribute exactly 0 (SUBS gives them log-probability 0).
    ``sigma`` and ``dsigma`` have shape (batch,).
    """
    log_p_x0 = torch.gather(log_p, -1, x0[:, :, None]).squeeze(-1)
    return -log_p_x0 * subs_weight(sigma, dsigma)[:, None]


def subs_loss_reweighted(log_p: torch.Tensor, x0: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """The loss under importance sampling or change of variables: the weight becomes the
    constant -log(1 - exp(-sigma_min)) (the Jacobian of the time transformation)."""
    log_p_x0 = torch.gather(log_p, -1, x0[:, :, None]).squeeze(-1)
    return -log_p_x0 * reweighted_weight(sigma_min, log_p)


# -log p_theta(x0 | xt) at masked positions only, from (k, vocab) logits whose [MASK] logit
# was set to NEG_INFINITY (``subs_fill``): the cross entropy over the real vocabulary, as
# ``subs_parameterization`` gives it; the per-sequence weight is applied by the caller
subs_rows = cross_entropy_rows


def subs_fill(mask_index: int) -> tuple[int, float]:
    """The logit the SUBS parameterization pushes to minus infinity, for the chunked path."""
    return mask_index, NEG_INFINITY


def subs_weight(sigma: torch.Tensor, dsigma: torch.Tensor) -> torch.Tensor:
    """The continuous-time weight sigma'(t) / (exp(sigma(t)) - 1) per sequence."""
    return dsigma / torch.expm1(sigma)


def reweighted_weight(sigma_min: float, like: torch.Tensor) -> torch.Tensor:
    """The constant weight under importance sampling or change of variables."""
    weight = torch.log1p(-torch.exp(-torch.as_tensor(sigma_min, dtype=like.dtype)))
    return -weight.to(like.device)
