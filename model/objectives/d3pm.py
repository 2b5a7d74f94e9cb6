"""D3PM (absorbing state) parameterization and the discrete-time bound, shared with SUBS."""

from __future__ import annotations

import torch

from model.objectives.subs import NEG_INFINITY
from model.projection import cross_entropy_rows


def d3pm_parameterization(logits: torch.Tensor, mask_index: int,
                          subs_masking: bool) -> torch.Tensor:
    """Log-softmax over the full vocabulary; with ``subs_masking`` [MASK] gets no mass."""
    if subs_masking:
        logits[..., mask_index] += NEG_INFINITY
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def discrete_time_terms(log_p_x0: torch.Tensor, p_mask: torch.Tensor, t: torch.Tensor,
                        T: int) -> torch.Tensor:
    """T [ (dt/t)(log(a_t p_m/t + 1) - log p(x0)) + (1 - dt/t)(log(a_t p_m/t + 1)
    - log(a_s p_m/s + 1)) ] elementwise, with a_t = 1 - t, s = t - 1/T; ``t`` broadcasts
    against the per-position ``log_p_x0`` and ``p_mask``."""
    dt = 1 / T
    t = t.clamp(0.0, 1.0 - 1e-4)
    alpha_t = 1 - t + torch.zeros_like(log_p_x0)
    alpha_s = 1 - (t - dt) + torch.zeros_like(log_p_x0)
    term_1_log_nr = torch.log(alpha_t * p_mask / t + 1)
    # At the first grid point (s = 0) the second term has weight 1 - dt/t = 0; keep it from
    # turning into 0 * log(0/0) = NaN.
    first = t - dt <= 0
    s = torch.where(first, torch.ones_like(t), t - dt)
    term_2_log_dr = torch.where(first, term_1_log_nr, torch.log(alpha_s * p_mask / s + 1))
    loss = (dt / t) * (term_1_log_nr - log_p_x0) + (1 - dt / t) * (term_1_log_nr - term_2_log_dr)
    return T * loss


def discrete_time_loss(log_p: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor,
                       t: torch.Tensor, T: int, mask_index: int) -> torch.Tensor:
    """The T-step bound (``discrete_time_terms``) at masked positions, zero elsewhere;
    ``log_p`` is the parameterized output (SUBS or D3PM), p_m its probability of [MASK]."""
    log_p_x0 = torch.gather(log_p, -1, x0[:, :, None]).squeeze(-1)
    p_mask = log_p[:, :, mask_index].exp()
    return discrete_time_terms(log_p_x0, p_mask, t[:, None], T) * (xt == mask_index)


def discrete_time_rows(logits: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                       T: int, mask_index: int) -> torch.Tensor:
    """The T-step bound at masked positions only: (k, vocab) raw logits (the [MASK] logit
    already at NEG_INFINITY for SUBS or ``subs_masking``, so that p_m = 0), their targets
    and times -> (k,)."""
    log_p = logits.log_softmax(-1)
    log_p_x0 = torch.gather(log_p, -1, x0[:, None]).squeeze(-1)
    return discrete_time_terms(log_p_x0, log_p[:, mask_index].exp(), t, T)


def reconstruction_loss(log_p_at_zero: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """-log p_theta(x0 | x0, t = 0) at every position (the D3PM reconstruction term)."""
    return -torch.gather(log_p_at_zero, -1, x0[:, :, None]).squeeze(-1)


# the reconstruction term from (k, vocab) raw logits at t = 0 (the [MASK] logit at
# NEG_INFINITY under ``subs_masking``) -> (k,)
reconstruction_rows = cross_entropy_rows
