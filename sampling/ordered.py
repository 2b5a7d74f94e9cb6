"""Ordered unmasking (MaskGIT, LLaDA, Dream): ``confidence``, ``margin``, ``entropy`` and
``random``.

At each of ``steps`` steps a number of masked positions fixed by the schedule is unmasked,
the positions with the highest score: the top-1 probability of p_theta (``confidence``),
top-1 minus top-2 (``margin``), the negative entropy (``entropy``), or a uniform draw
(``random``). Each unmasked position takes a token drawn from p_theta (after temperature
and nucleus). ``order_temperature`` adds that multiple of Gumbel noise to the scores (0:
exactly in score order). The schedule: after step i of T, n (1 - gamma((i + 1) / T))
positions (rounded) have been unmasked, gamma(r) = 1 - r (``linear``) or cos(pi r / 2)
(``cosine``); a step with nothing to unmask is skipped, so the number of network calls is
the number of steps taken.

``confidence_threshold`` (Fast-dLLM's parallel rule) replaces the schedule: every masked
position whose top-1 probability exceeds it unmasks, and at least the best-scored one per
step, until nothing is masked.
"""

from __future__ import annotations

import math

import torch

from sampling.registry import State, register


def schedule(n: int, steps: int, kind: str) -> list[int]:
    """Positions unmasked at each step, summing to n."""
    def gamma(r):
        return 1 - r if kind == "linear" else math.cos(math.pi * r / 2)
    done = [round(n * (1 - gamma(i / steps))) for i in range(steps + 1)]
    done[-1] = n
    return [b - a for a, b in zip(done, done[1:])]


def scores(kind: str, probs: torch.Tensor, state: State) -> torch.Tensor:
    """(batch, length) scores, higher first, from (batch, length, vocab) probabilities."""
    if kind == "confidence":
        return probs.amax(-1).double()
    if kind == "margin":
        top = probs.topk(2, dim=-1).values.double()
        return top[..., 0] - top[..., 1]
    if kind == "entropy":
        p = probs.double()
        return torch.where(p > 0, p * p.log(), 0).sum(-1)
    return torch.rand(probs.shape[:2], generator=state.generator, device=probs.device,
                      dtype=torch.float64)


def _perturbed(kind: str, probs, state: State, masked) -> torch.Tensor:
    s = scores(kind, probs, state)
    tau = float(state.knobs.order_temperature)
    if tau > 0 and kind != "random":
        u = torch.rand(s.shape, generator=state.generator, device=s.device,
                       dtype=torch.float64)
        s = s - tau * u.clamp_min_(torch.finfo(u.dtype).tiny).log_().neg_().log_()
    return s.masked_fill(~masked, -math.inf)


def _probs(state: State) -> torch.Tensor:
    """p_theta at the current state, at the time the masked fraction gives (only a
    time-conditioned model reads it)."""
    x = state.x
    free = (~state.fixed).sum(-1).clamp_min(1)
    t = ((x == state.mask_index).sum(-1) / free).clamp(min=state.knobs.eps).float()
    return state.p_x0(x, state.sigma(t))


def ordered(kind: str, state: State) -> None:
    if state.knobs.confidence_threshold is not None:
        return _threshold(kind, state)
    n = int((state.x[0] == state.mask_index).sum())  # the same in every row
    taken = 0
    for k in schedule(n, int(state.knobs.steps), state.knobs.unmask_schedule):
        if k == 0:
            continue
        if state.stop_after is not None and taken >= state.stop_after:
            break
        taken += 1
        x = state.x
        masked = x == state.mask_index
        probs = _probs(state)
        cols = _perturbed(kind, probs, state, masked).topk(k, dim=-1).indices  # (batch, k)
        chosen = probs.gather(1, cols[..., None].expand(-1, -1, probs.shape[-1]))
        x.scatter_(1, cols, state.draw(chosen))


def _threshold(kind: str, state: State) -> None:
    threshold = float(state.knobs.confidence_threshold)
    rows = torch.arange(state.x.shape[0], device=state.x.device)
    for _ in range(int((state.x[0] == state.mask_index).sum())):
        x = state.x
        masked = x == state.mask_index
        if not bool(masked.any()):
            break
        probs = _probs(state)
        chosen = masked & (probs.amax(-1) > threshold)
        best = _perturbed(kind, probs, state, masked).argmax(-1)
        chosen[rows, best] |= masked[rows, best]  # at least one per row still masked
        x[chosen] = state.draw(probs[chosen])


for _kind in ("confidence", "margin", "entropy", "random"):
    register(_kind, parameterizations=("subs",), always_denoise=False)(
        lambda state, kind=_kind: ordered(kind, state))
