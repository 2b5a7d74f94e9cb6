"""Reverse-process samplers of masked diffusion models: ``ddpm``, ``ddpm_cache`` and
``analytic`` (Tweedie tau-leaping with the score), and ``sample``, the one entry point of
every registered predictor.

Time runs from 1 to ``eps`` = 1e-5 on ``steps`` equal intervals. At a masked position,
moving from t to s, the token becomes x with probability proportional to
p_theta(x) (alpha_s - alpha_t) and stays masked with probability proportional to 1 - alpha_s;
unmasked positions never change. ``noise_removal`` ends with one greedy step at t = eps.
"""

from __future__ import annotations

import torch

from sampling.knobs import Knobs, check_model
from sampling.registry import PREDICTORS, Counter, State, load, register
from sampling.warp import warp_probs


def ddpm_step(state: State, t: torch.Tensor) -> None:
    """One ancestral step (the release's ``_ddpm_update``)."""
    model, x = state.model, state.x
    sigma_t, sigma_s = state.sigma(t), state.sigma(t - state.dt)
    move_t = (1 - torch.exp(-sigma_t))[:, None, None]
    move_s = (1 - torch.exp(-sigma_s))[:, None, None]
    q_xs = state.p_x0(x, sigma_t) * (move_t - move_s)
    q_xs[:, :, model.mask_index] = move_s[:, :, 0]
    state.x = torch.where(x != model.mask_index, x, state.draw(q_xs))


@register("ddpm")
def ddpm(state: State) -> None:
    times = state.timesteps()
    for i in range(state.steps_to_run):
        ddpm_step(state, state.batch_times(times[i]))


def ddpm_cache_step(state: State, t: torch.Tensor, p_x0):
    """One step of the release's ``_ddpm_caching_update``: with the log-linear schedule the
    masking probabilities are t and t - dt; ``p_x0`` is reused when given. Returns the
    prediction to reuse at the next step (None when it may have changed)."""
    model, x = state.model, state.x
    move_t, move_s = t[:, None, None], (t - state.dt)[:, None, None]
    if p_x0 is None:
        p_x0 = state.p_x0(x, state.sigma(t))
    q_xs = p_x0 * (move_t - move_s)
    q_xs[:, :, model.mask_index] = move_s[:, :, 0]
    x_next = torch.where(x != model.mask_index, x, state.draw(q_xs))
    # (time conditioning first: it spares the host sync of the comparison)
    changed = model.config.time_conditioning or not torch.equal(x_next, x)
    state.x = x_next
    return None if changed else p_x0


@register("ddpm_cache", needs_loglinear=True)
def ddpm_cache(state: State) -> None:
    times, p_x0 = state.timesteps(), None
    for i in range(state.steps_to_run):
        p_x0 = ddpm_cache_step(state, state.batch_times(times[i]), p_x0)


def score(state: State, x, sigma) -> torch.Tensor:
    """The ratios p_t(y) / p_t(x_t) for every candidate y: SEDD's output directly, or a SUBS
    model's implied score (k = exp(-sigma) / (1 - exp(-sigma)): at a masked position
    p_theta(y) k for y != [MASK] and 1 for [MASK]; at an unmasked one 1 for itself, 1/k for
    [MASK], 0 otherwise). Temperature and nucleus act on p_theta: for SEDD, on the masked
    positions' scores normalised over the tokens."""
    model, knobs = state.model, state.knobs
    out = state.net(x, sigma)
    if model.parameterization == "subs":
        if knobs.warps:
            out = warp_probs(out.exp(), knobs).log()
        log_k = -torch.log(torch.expm1(sigma))
        masked_score = out + log_k[:, None, None]
        masked_score[:, :, model.mask_index] = 0
        unmasked_score = torch.full_like(out, -1_000_000.0)
        unmasked_score = torch.scatter(unmasked_score, -1, x[..., None],
                                       torch.zeros_like(unmasked_score[..., :1]))
        unmasked_score[:, :, model.mask_index] = -(log_k[:, None] * torch.ones_like(x))
        masked = (x == model.mask_index).to(out.dtype)[:, :, None]
        out = masked_score * masked + unmasked_score * (1 - masked)
        return out.exp()
    ratios = out.exp()
    if knobs.warps:
        masked = x == model.mask_index
        tokens = ratios[masked].double()
        mask_ratio = tokens[:, model.mask_index].clone()
        tokens[:, model.mask_index] = 0
        total = tokens.sum(-1, keepdim=True)
        tokens = warp_probs(tokens / total, knobs) * total
        tokens[:, model.mask_index] = mask_ratio
        ratios = ratios.double()
        ratios[masked] = tokens
    return ratios


def _staggered(s: torch.Tensor, dsigma: torch.Tensor, mask_index: int) -> torch.Tensor:
    s = s.clone()
    extra = (1 - dsigma.exp())[:, None] * s.sum(dim=-1)
    s *= dsigma.exp()[:, None, None]
    s[..., mask_index] += extra
    return s


def _transposed_transition(x, sigma, vocab_size, mask_index):
    """exp(-sigma) on the current token, plus 1 - exp(-sigma) everywhere when it is [MASK]:
    written into one float tensor (a one-hot of x would be a batch x length x vocab int64)."""
    stay = torch.exp(-sigma)[:, None, None]
    edge = torch.zeros(*x.shape, vocab_size, dtype=stay.dtype, device=x.device)
    edge.scatter_(-1, x[..., None], stay.expand(*x.shape, 1))
    edge += torch.where(x == mask_index, 1 - stay[..., 0], 0)[..., None]
    return edge


def analytic_step(state: State, t: torch.Tensor) -> None:
    model, x = state.model, state.x
    sigma_t, sigma_s = state.sigma(t), state.sigma(t - state.dt)
    dsigma = sigma_t - sigma_s
    s = _staggered(score(state, x, sigma_t), dsigma, model.mask_index)
    probs = s * _transposed_transition(x, dsigma, model.vocab_size, model.mask_index)
    state.x = torch.where(state.fixed, x, state.draw(probs))


@register("analytic", always_denoise=True, analytic_denoise=True)
def analytic(state: State) -> None:
    times = state.timesteps()
    for i in range(state.steps_to_run):
        analytic_step(state, state.batch_times(times[i]))


def denoise(state: State, analytic: bool) -> None:
    """The last step at t = eps: the analytic sampler's Tweedie step (ds = sigma(t_min),
    [MASK] forbidden), or the release's greedy argmax of p_theta."""
    model, x = state.model, state.x
    t = state.batch_times(state.knobs.eps)
    sigma = state.sigma(t)
    if analytic:
        s = _staggered(score(state, x, sigma), sigma, model.mask_index)
        probs = s * _transposed_transition(x, sigma, model.vocab_size, model.mask_index)
        probs[..., model.mask_index] = 0
        state.x = torch.where(state.fixed, x, state.draw(probs))
    else:
        state.x = torch.where(state.fixed, x, state.net(x, sigma).argmax(dim=-1))


@torch.no_grad()
def sample(model, batch_size: int, length: int, knobs: Knobs | None = None, *,
           generator=None, prefix: torch.Tensor | None = None,
           stop_after: int | None = None, **changes):
    """Draws ``batch_size`` sequences of ``length`` tokens; returns (tokens, NFE).

    ``knobs`` (default ``Knobs()``) with any field replaced by ``changes`` (``steps=``,
    ``predictor=``, ``top_p=`` ...) chooses the predictor and its settings.
    ``prefix`` (batch, k) fixes the first k tokens (clean) for semi-autoregressive windows.
    ``stop_after`` ends a step-by-step predictor after that many of its ``steps`` (for
    timing the first steps of a long schedule); the result is then still partly masked.
    """
    knobs = (knobs or Knobs()).replace(**changes) if changes else (knobs or Knobs())
    load()
    check_model(knobs, model.parameterization, bool(model.config.time_conditioning),
                model.noise.name)
    entry = PREDICTORS[knobs.predictor]
    device = next(model.parameters()).device
    x = torch.full((batch_size, length), model.mask_index, dtype=torch.long, device=device)
    if prefix is not None:
        x[:, : prefix.shape[1]] = prefix
    state = State(model, Counter(model), x, knobs, generator, x != model.mask_index,
                  stop_after)
    entry.run(state)
    if knobs.noise_removal and (entry.always_denoise or
                                bool((state.x == model.mask_index).any())):
        denoise(state, entry.analytic_denoise)
    return state.x, state.net.nfe


__all__ = ["PREDICTORS", "sample"]
