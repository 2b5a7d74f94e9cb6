"""Reverse-process samplers of masked diffusion models: ``ddpm``, ``ddpm_cache``, ``analytic``
(Tweedie tau-leaping with the score) and the exact fast sampler ``ddpm_fast``.

Time runs from 1 to ``eps`` = 1e-5 on ``steps`` equal intervals. At a masked position,
moving from t to s, the token becomes x with probability proportional to
p_theta(x) (alpha_s - alpha_t) and stays masked with probability proportional to 1 - alpha_s;
unmasked positions never change. ``noise_removal`` ends with one greedy step at t = eps.
"""

from __future__ import annotations

import torch

from sampling.categorical import sample_categorical

PREDICTORS = ("ddpm", "ddpm_cache", "analytic", "ddpm_fast")


class Counter:
    """Counts network calls (NFE)."""

    def __init__(self, model):
        self.model, self.nfe = model, 0

    def __call__(self, x, sigma):
        self.nfe += 1
        return self.model(x, sigma)


def _sigma(model, t: torch.Tensor) -> torch.Tensor:
    return model.noise(t)[0]


def ddpm_update(net, model, x, t, dt, generator, gumbel_dtype):
    """One ancestral step (the release's ``_ddpm_update``)."""
    sigma_t, sigma_s = _sigma(model, t), _sigma(model, t - dt)
    move_t = (1 - torch.exp(-sigma_t))[:, None, None]
    move_s = (1 - torch.exp(-sigma_s))[:, None, None]
    log_p_x0 = net(x, sigma_t)
    q_xs = log_p_x0.exp() * (move_t - move_s)
    q_xs[:, :, model.mask_index] = move_s[:, :, 0]
    new = sample_categorical(q_xs, generator, gumbel_dtype)
    return torch.where(x != model.mask_index, x, new)


def ddpm_cache_update(net, model, x, t, dt, p_x0, generator, gumbel_dtype):
    """One step of the release's ``_ddpm_caching_update``: with the log-linear schedule the
    masking probabilities are t and t - dt; ``p_x0`` is reused when given."""
    sigma_t = _sigma(model, t)
    move_t, move_s = t[:, None, None], (t - dt)[:, None, None]
    if p_x0 is None:
        p_x0 = net(x, sigma_t).exp()
    q_xs = p_x0 * (move_t - move_s)
    q_xs[:, :, model.mask_index] = move_s[:, :, 0]
    new = sample_categorical(q_xs, generator, gumbel_dtype)
    return p_x0, torch.where(x != model.mask_index, x, new)


def score(net, model, x, sigma) -> torch.Tensor:
    """The ratios p_t(y) / p_t(x_t) for every candidate y: SEDD's output directly, or a SUBS
    model's implied score (k = exp(-sigma) / (1 - exp(-sigma)): at a masked position
    p_theta(y) k for y != [MASK] and 1 for [MASK]; at an unmasked one 1 for itself, 1/k for
    [MASK], 0 otherwise)."""
    out = net(x, sigma)
    if model.parameterization == "subs":
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


def analytic_update(net, model, x, t, dt, generator, gumbel_dtype):
    sigma_t, sigma_s = _sigma(model, t), _sigma(model, t - dt)
    dsigma = sigma_t - sigma_s
    s = _staggered(score(net, model, x, sigma_t), dsigma, model.mask_index)
    probs = s * _transposed_transition(x, dsigma, model.vocab_size, model.mask_index)
    return sample_categorical(probs, generator, gumbel_dtype)


def denoiser_update(net, model, x, t, generator, gumbel_dtype):
    """The analytic sampler's last step: ds = sigma(t_min), [MASK] forbidden."""
    sigma = _sigma(model, t)
    s = _staggered(score(net, model, x, sigma), sigma, model.mask_index)
    probs = s * _transposed_transition(x, sigma, model.vocab_size, model.mask_index)
    probs[..., model.mask_index] = 0
    return sample_categorical(probs, generator, gumbel_dtype)


@torch.no_grad()
def sample(model, batch_size: int, length: int, steps: int = 128, predictor: str = "ddpm_cache",
           noise_removal: bool = True, eps: float = 1e-5, generator=None,
           gumbel_dtype: str = "float64", prefix: torch.Tensor | None = None,
           stop_after: int | None = None):
    """Draws ``batch_size`` sequences of ``length`` tokens; returns (tokens, NFE).

    ``prefix`` (batch, k) fixes the first k tokens (clean) for semi-autoregressive windows.
    ``stop_after`` ends a step-by-step predictor after that many of its ``steps`` (for
    timing the first steps of a long schedule); the result is then still partly masked.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"sampling.predictor={predictor} is not one of {list(PREDICTORS)}.")
    device = next(model.parameters()).device
    x = torch.full((batch_size, length), model.mask_index, dtype=torch.long, device=device)
    if prefix is not None:
        x[:, : prefix.shape[1]] = prefix
    if predictor in ("ddpm_cache", "ddpm_fast") and model.noise.name != "loglinear":
        raise ValueError(f"sampling.predictor={predictor} needs noise=loglinear.")
    net = Counter(model)
    if predictor == "ddpm_fast":
        from sampling.fast import fast_sample

        x = fast_sample(net, model, x, steps, eps, generator, gumbel_dtype)
    else:
        timesteps = torch.linspace(1, eps, steps + 1, device=device)
        dt = (1 - eps) / steps
        p_x0 = None
        for i in range(steps if stop_after is None else min(steps, stop_after)):
            t = timesteps[i] * torch.ones(batch_size, device=device)
            if predictor == "ddpm":
                x = ddpm_update(net, model, x, t, dt, generator, gumbel_dtype)
            elif predictor == "ddpm_cache":
                p_x0, x_next = ddpm_cache_update(net, model, x, t, dt, p_x0, generator,
                                                 gumbel_dtype)
                # (time conditioning first: it spares the host sync of the comparison)
                if model.config.time_conditioning or not torch.equal(x_next, x):
                    p_x0 = None
                x = x_next
            else:
                x = analytic_update(net, model, x, t, dt, generator, gumbel_dtype)
    if noise_removal:
        t = eps * torch.ones(batch_size, device=device)
        if predictor == "analytic":
            x = denoiser_update(net, model, x, t, generator, gumbel_dtype)
        elif predictor != "ddpm_fast" or bool((x == model.mask_index).any()):
            x = net(x, _sigma(model, t)).argmax(dim=-1)
    return x, net.nfe
