"""The exact fast sampler (``ddpm_fast``): the distribution of ``ddpm_cache`` at the network-
call limit, for models that are not time conditioned.

Under ``ddpm_cache`` a masked position unmasks at step i with probability
(t_i - t_{i+1}) / t_i given that it is still masked, that is with probability dt at every
step and eps never, independently of the network and of the other positions; when it
unmasks its token follows p_theta(. | current state). Without time conditioning the
prediction changes only when the state does. So: draw every position's unmasking step from
the schedule alone, call the network only at the distinct steps where something unmasks,
and draw tokens only for the positions that unmask there (the network projects only
those positions onto the vocabulary).
"""

from __future__ import annotations

import torch

from model.objectives import NEG_INFINITY
from sampling.categorical import sample_categorical


def fast_sample(net, model, x, steps: int, eps: float, generator, gumbel_dtype: str):
    if model.parameterization != "subs":
        raise ValueError("sampling.predictor=ddpm_fast samples SUBS models (parameterization=subs"
                         f"), not {model.parameterization}; use ddpm_cache or analytic.")
    if model.config.time_conditioning:
        raise ValueError("sampling.predictor=ddpm_fast needs a model without time "
                         "conditioning (its prediction must not depend on t); use ddpm_cache.")
    device = x.device
    masked = x == model.mask_index
    # step at which each position unmasks: 0..steps-1 with probability dt = (1 - eps)/steps
    # each, or `steps` (never; left to noise removal) with probability eps
    u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
    when = torch.floor(u * steps / (1 - eps)).long().clamp_(max=steps)
    when[~masked] = -1
    sigma = torch.zeros(x.shape[0], device=device)
    for rows, cols in _positions_by_step(when, steps):
        # one network call; only the unmasking positions are projected onto the vocabulary
        net.nfe += 1
        logits = model.backbone(x, sigma, positions=(rows, cols)).float()
        logits[:, model.mask_index] += NEG_INFINITY  # SUBS: never [MASK]
        probs = logits.softmax(-1)
        x[rows, cols] = sample_categorical(probs, generator, gumbel_dtype)
    return x


def _positions_by_step(when: torch.Tensor, steps: int):
    """(rows, cols) of the positions unmasking at each distinct step in 0..steps-1, in
    increasing step order and row-major order within a step (the order of ``nonzero``),
    grouped with one host synchronization rather than one per step."""
    flat = when.reshape(-1)
    index = torch.nonzero((flat >= 0) & (flat < steps)).squeeze(1)
    order = torch.sort(flat[index], stable=True)
    _, counts = torch.unique_consecutive(order.values, return_counts=True)
    length = when.shape[1]
    for group in index[order.indices].split(counts.tolist()):
        yield group // length, group % length
