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
from sampling.registry import State, register
from sampling.warp import warp_probs


def token_probs(state: State, rows, cols) -> torch.Tensor:
    """p_theta(x0 | x) at the positions (rows, cols) only, after temperature and nucleus;
    one network call that projects just those positions onto the vocabulary."""
    model = state.model
    state.net.nfe += 1
    sigma = torch.zeros(state.x.shape[0], device=state.x.device)
    logits = model.backbone(state.x, sigma, positions=(rows, cols)).float()
    logits[:, model.mask_index] += NEG_INFINITY  # SUBS: never [MASK]
    probs = logits.softmax(-1)
    return warp_probs(probs, state.knobs) if state.knobs.warps else probs


@register("ddpm_fast", parameterizations=("subs",), needs_loglinear=True,
          needs_time_free=True, always_denoise=False)
def fast_sample(state: State) -> None:
    x, steps, eps = state.x, int(state.knobs.steps), state.knobs.eps
    masked = x == state.mask_index
    # step at which each position unmasks: 0..steps-1 with probability dt = (1 - eps)/steps
    # each, or `steps` (never; left to noise removal) with probability eps
    u = torch.rand(x.shape, generator=state.generator, device=x.device, dtype=torch.float64)
    when = torch.floor(u * steps / (1 - eps)).long().clamp_(max=steps)
    when[~masked] = -1
    for rows, cols in _positions_by_step(when, steps):
        x[rows, cols] = state.draw(token_probs(state, rows, cols))


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
