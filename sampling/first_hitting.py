"""``first_hitting``: the exact continuous-time sampler (Zheng et al., arXiv 2409.02908) for
models without time conditioning.

Under the log-linear schedule a position masked at time t is still masked at s < t with
probability s / t, independently of the others. With n masked positions the first of them
to unmask does so at t u^(1/n) (u uniform: the largest of n uniforms on (0, t)), and it is
uniform among them; its token follows p_theta(. | current state), which does not depend on
t. So every event costs one network call (projecting one position per row) and unmasks one
position; a row whose next time falls below eps stops there and leaves the rest to noise
removal. This is ``ddpm_fast``'s law as its number of steps grows without bound.
"""

from __future__ import annotations

import torch

from sampling.fast import token_probs
from sampling.registry import State, register


@register("first_hitting", parameterizations=("subs",), needs_loglinear=True,
          needs_time_free=True, always_denoise=False)
def first_hitting(state: State) -> None:
    x, g, eps = state.x, state.generator, state.knobs.eps
    batch, device = x.shape[0], x.device
    rows = torch.arange(batch, device=device)
    t = torch.ones(batch, dtype=torch.float64, device=device)
    masked = x == state.mask_index
    for n in range(int(masked[0].sum()), 0, -1):  # every row has as many masked positions
        u = torch.rand(batch, generator=g, device=device, dtype=torch.float64)
        t = t * u.pow(1.0 / n)
        active = t >= eps
        if not bool(active.any()):
            break
        # one position uniform among the masked ones of each row
        cols = state.draw(masked.double())
        act_rows, act_cols = rows[active], cols[active]
        x[act_rows, act_cols] = state.draw(token_probs(state, act_rows, act_cols))
        masked[act_rows, act_cols] = False
        t = torch.where(active, t, torch.zeros_like(t))  # a stopped row stays stopped
