"""ReMDM's remasking samplers (Wang et al., arXiv 2503.00307; kuleshov-group/remdm):
``remdm-cap``, ``remdm-rescale``, ``remdm-conf`` and ``remdm-loop``, for SUBS models under
the log-linear schedule (alpha_t = 1 - t, as ``ddpm_cache`` steps).

One step from t to s remasks an unmasked token with probability sigma and otherwise keeps
it; a masked position becomes x with probability p_theta(x) (alpha_s - (1 - sigma) alpha_t)
/ (1 - alpha_t) and stays masked with probability (1 - alpha_s - sigma alpha_t) /
(1 - alpha_t). sigma = 0 is MDLM's step. The samplers choose sigma:
- ``remdm-cap``: min(eta, (1 - alpha_s) / alpha_t);
- ``remdm-rescale``: eta * sigma_max, sigma_max = min(1, (1 - alpha_s) / alpha_t);
- ``remdm-conf``: sigma_max times a softmax over the unmasked positions of minus the
  probability each token had when it was drawn (the least confident remask first);
- ``remdm-loop``: MDLM from t = 1 down to t_on, taking alpha from 0 to alpha_on; then, until
  t_off, steps at a constant alpha = alpha_on with sigma = eta (the loop, where tokens are
  remasked and redrawn); then MDLM from alpha_on to 1.
The prediction is reused while nothing changed and the model is not time conditioned, as
in ``ddpm_cache``. Positions given clean (a semi-AR prefix) are never remasked.
"""

from __future__ import annotations

import math

import torch

from sampling.registry import State, register


def remask_step(state: State, p_x0: torch.Tensor, alpha_t: float, alpha_s: float,
                sigma) -> torch.Tensor:
    """The tokens after one ReMDM step; ``sigma`` is a number or a (batch, length) tensor."""
    x, mask = state.x, state.mask_index
    sig = torch.as_tensor(sigma, dtype=p_x0.dtype, device=x.device)
    sig = sig.expand(x.shape)[..., None]
    keep = p_x0 * (1 - sig)
    keep[..., mask] = sig[..., 0]
    fill = p_x0 * ((alpha_s - (1 - sig) * alpha_t) / (1 - alpha_t))
    fill[..., mask] = ((1 - alpha_s - sig * alpha_t) / (1 - alpha_t))[..., 0]
    q_xs = torch.where((x != mask)[..., None], keep, fill)
    return torch.where(state.fixed, x, state.draw(q_xs))


def mdlm_step(state: State, p_x0: torch.Tensor, move_t: float, move_s: float):
    """``ddpm_cache``'s step between masking probabilities move_t and move_s."""
    x = state.x
    q_xs = p_x0 * (move_t - move_s)
    q_xs[..., state.mask_index] = move_s
    return torch.where(x != state.mask_index, x, state.draw(q_xs))


def loop_phase(t: float, dt: float, knobs):
    """remdm-loop at time t: ("mdlm", move_t, move_s) or ("loop", alpha_on, alpha_on)."""
    a_on, t_on, t_off = knobs.alpha_on, knobs.t_on, knobs.t_off
    if t > t_on:
        return "mdlm", 1 - (1 - t) * a_on / (1 - t_on), 1 - (1 - t + dt) * a_on / (1 - t_on)
    if t <= t_off:
        return "mdlm", t * (1 - a_on) / t_off, (t - dt) * (1 - a_on) / t_off
    return "loop", a_on, a_on


def _sigma_max(alpha_t: float, alpha_s: float) -> float:
    return min(1.0, (1 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0


def _conf_sigma(conf: torch.Tensor, x, mask_index: int, sigma_max: float) -> torch.Tensor:
    weights = torch.softmax(conf, dim=-1).nan_to_num_(0.0)  # a row of -inf: nothing to remask
    return weights.masked_fill_(x == mask_index, 0) * sigma_max


def remdm(kind: str, state: State) -> None:
    knobs, model = state.knobs, state.model
    eta, dt = knobs.remdm_eta, state.dt
    times = state.timesteps().tolist()
    conf = torch.full(state.x.shape, -math.inf, dtype=torch.float64, device=state.x.device)
    p_x0 = None
    for i in range(state.steps_to_run):
        t, x = times[i], state.x
        alpha_t, alpha_s = 1 - t, 1 - (t - dt)
        if p_x0 is None:
            p_x0 = state.p_x0(x, state.sigma(state.batch_times(t)))
        if kind == "remdm-loop":
            phase, a, b = loop_phase(t, dt, knobs)
            new = (mdlm_step(state, p_x0, a, b) if phase == "mdlm"
                   else remask_step(state, p_x0, a, b, eta))
        elif kind == "remdm-conf":
            sigma = _conf_sigma(conf, x, state.mask_index, _sigma_max(alpha_t, alpha_s))
            new = remask_step(state, p_x0, alpha_t, alpha_s, sigma)
            drawn = (x == state.mask_index) & (new != state.mask_index)
            p_new = p_x0.gather(-1, new[..., None])[..., 0].double()
            conf = torch.where(drawn, -p_new, conf)
            conf = conf.masked_fill((x != state.mask_index) & (new == state.mask_index),
                                    -math.inf)
        else:
            sigma = (min(eta, (1 - alpha_s) / alpha_t) if alpha_t > 0 else eta) \
                if kind == "remdm-cap" else eta * _sigma_max(alpha_t, alpha_s)
            new = remask_step(state, p_x0, alpha_t, alpha_s, sigma)
        if model.config.time_conditioning or not torch.equal(new, x):
            p_x0 = None
        state.x = new


for _kind in ("remdm-cap", "remdm-rescale", "remdm-conf", "remdm-loop"):
    register(_kind, parameterizations=("subs",), needs_loglinear=True)(
        lambda state, kind=_kind: remdm(kind, state))
