"""Statistical tests of the training objectives against closed-form values.

The network is replaced by toy denoisers whose output is the *exact* posterior p(x0 | xt) of
toy data, so the expected loss is known in closed form and a Monte Carlo estimate through
``Diffusion.loss`` must land within a few standard errors of it:

* i.i.d. tokens x0_l ~ pi: the posterior at a masked position is pi, whatever else is visible.
  Under the log-linear schedule the SUBS weight is 1/t and the masking probability (1-eps) t,
  so E[loss per token] = (1 - eps) H(pi) for any distribution of t.
* "copy" sequences: all L positions hold the same token x ~ pi. The posterior at a masked
  position is a point mass on the visible copy when one exists, and pi when every position
  is masked (probability m(t)^L with m(t) = (1-eps) t). The loss per token is therefore
  (1/t) m(t)^L H(pi) = (1-eps)^L t^(L-1) H(pi); with t ~ U[s, 1] (s = sampling_eps),
  E[t^(L-1)] = (1 - s^L) / (L (1 - s)).

Antithetic sampling correlates the t values inside a batch, so the per-batch mean loss is the
i.i.d. unit of the Monte Carlo estimates (its standard error comes from their spread).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from model import objectives as obj
from model.config import ModelConfig
from model.diffusion import Diffusion

V = 8
MASK = V - 1
EPS = 1e-3  # the log-linear schedule's eps
SAMPLING_EPS = 1e-3
PI = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05], dtype=torch.float64)
H_PI = float(-(PI * PI.log()).sum())  # entropy of pi, nats
BIG_NEG = -1e4  # toy "log 0" for logits (exp() is exactly 0 in float32 after the softmax)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny: intra-op threads only add overhead (and stall under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(length: int, **changes) -> ModelConfig:
    return ModelConfig(vocab_size=V, mask_index=MASK, length=length, hidden_size=32,
                       cond_dim=16, n_blocks=1, n_heads=2, dropout=0.0, **changes)


def log_pi_logits() -> torch.Tensor:
    """Logits over the V entries: log pi on the tokens; the [MASK] entry gets a large value,
    which SUBS must push to -inf (and SEDD must ignore)."""
    out = torch.empty(V, dtype=torch.float32)
    out[:MASK] = PI.log().float()
    out[MASK] = 5.0
    return out


class IIDDenoiser(nn.Module):
    """Exact posterior of i.i.d. tokens: log pi at every position."""

    def __init__(self, extra: float = 0.0):
        super().__init__()
        self.register_buffer("logits", log_pi_logits() + extra)
        self.seen_sigma: list[torch.Tensor] = []

    def forward(self, indices, sigma=None):
        if sigma is not None:
            self.seen_sigma.append(sigma.detach().clone())
        b, n = indices.shape
        return self.logits.expand(b, n, V).clone()


class CopyDenoiser(nn.Module):
    """Exact posterior of copy sequences (every position holds the same token x ~ pi):
    a point mass on the visible token when any position is visible, else pi."""

    def __init__(self, extra: float = 0.0):
        super().__init__()
        self.register_buffer("logits", log_pi_logits() + extra)
        self.extra = extra

    def forward(self, indices, sigma=None):
        b, n = indices.shape
        visible = indices != MASK
        any_visible = visible.any(dim=1)
        first = visible.int().argmax(dim=1)  # a visible position (0 when none)
        token = indices.gather(1, first[:, None]).squeeze(1).clamp(max=MASK - 1)
        copy = torch.full((b, V), BIG_NEG, dtype=torch.float32, device=indices.device)
        copy.scatter_(1, token[:, None], 0.0)
        copy = copy + self.extra
        prior = self.logits.expand(b, V)
        rows = torch.where(any_visible[:, None], copy, prior)
        return rows[:, None, :].expand(b, n, V).clone()


def toy_model(length: int, backbone: nn.Module, **changes) -> Diffusion:
    model = Diffusion(tiny_config(length, **changes))
    model.backbone = backbone
    return model.eval()


def sample_iid(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(PI.float(), batch * length, replacement=True,
                             generator=gen).view(batch, length)


def sample_copy(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.multinomial(PI.float(), batch, replacement=True, generator=gen)
    return x[:, None].expand(batch, length).clone()


def batch_means(model: Diffusion, sampler, n_batches: int, batch: int, length: int,
                seed: int) -> torch.Tensor:
    """Per-batch mean losses of Diffusion.loss (the i.i.d. Monte Carlo units)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n_batches, dtype=torch.float64)
    with torch.no_grad():
        for i in range(n_batches):
            x0 = sampler(batch, length, gen)
            loss = model.loss(x0, generator=gen)
            assert torch.isfinite(loss.nlls).all()
            out[i] = loss.loss.item()
    return out


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(len(values)))


def assert_within(values: torch.Tensor, expected: float, rel_se: float, n_se: float = 3.0,
                  bias_tol: float = 0.0):
    mean, se = mean_and_se(values)
    # The estimate must be precise enough to be a real test, and agree with the closed form.
    assert se < rel_se * abs(expected), f"standard error {se} too large for {expected}"
    assert abs(mean - expected) < n_se * se + bias_tol, (
        f"Monte Carlo mean {mean:.5f} (se {se:.5f}) differs from the closed form "
        f"{expected:.5f} by {abs(mean - expected) / se:.1f} standard errors")


def copy_bound_continuous(length: int) -> float:
    """(1-eps)^L E[t^(L-1)] H(pi) with t ~ U[sampling_eps, 1]."""
    s = SAMPLING_EPS
    e_t_pow = (1 - s ** length) / (length * (1 - s))
    return (1 - EPS) ** length * e_t_pow * H_PI


def copy_bound_discrete(length: int, T: int) -> float:
    """Exact expectation of the T-step SUBS estimate on copy sequences.

    t ~ U[s, 1) is rounded up to t_k = (k+1)/T with k = floor(t T) (probability: the length
    of [k/T, (k+1)/T) within [s, 1), over 1 - s). The masking probability is (1-eps) t_k; at a
    masked position the loss is T (dt/t_k) (-log p(x0)) (SUBS: p_m = 0, so the log(... + 1)
    terms vanish) with t_k clamped to 1 - 1e-4 in the weight, as the reference does.
    """
    s = SAMPLING_EPS
    total = 0.0
    for k in range(T):
        lo, hi = max(k / T, s), (k + 1) / T
        if hi <= lo:
            continue
        prob = (hi - lo) / (1 - s)
        t_k = (k + 1) / T
        weight = 1.0 / min(t_k, 1 - 1e-4)
        total += prob * ((1 - EPS) * t_k) ** length * weight
    return total * H_PI


# --------------------------------------------------------------------- 1. continuous SUBS


def test_iid_subs_bound_matches_closed_form():
    """E[loss per token] = (1 - eps) H(pi): checks the weight sigma'/(e^sigma - 1) = 1/t, the
    masking probability (1 - eps) t and the SUBS carry-over (unmasked positions cost 0)."""
    length = 16
    model = toy_model(length, IIDDenoiser())
    values = batch_means(model, sample_iid, n_batches=2000, batch=64, length=length, seed=0)
    assert_within(values, (1 - EPS) * H_PI, rel_se=0.003)


def test_iid_subs_bound_detects_a_wrong_denoiser():
    """Sanity check of the test's power: a mismatched denoiser (uniform over tokens) has a
    larger expected loss, (1 - eps) * cross-entropy(pi, uniform), and the estimate sees it."""
    length = 16

    class Uniform(IIDDenoiser):
        def forward(self, indices, sigma=None):
            b, n = indices.shape
            return torch.zeros(b, n, V)

    model = toy_model(length, Uniform())
    values = batch_means(model, sample_iid, n_batches=200, batch=64, length=length, seed=1)
    expected = (1 - EPS) * math.log(V - 1)
    assert_within(values, expected, rel_se=0.02)
    mean, se = mean_and_se(values)
    assert mean - (1 - EPS) * H_PI > 10 * se


@pytest.mark.parametrize("length", [2, 3])
def test_copy_subs_bound_matches_closed_form(length):
    """Context-dependent toy: E[loss per token] = (1-eps)^L E_t[t^(L-1)] H(pi)."""
    model = toy_model(length, CopyDenoiser())
    values = batch_means(model, sample_copy, n_batches=1500, batch=256, length=length,
                         seed=10 + length)
    assert_within(values, copy_bound_continuous(length), rel_se=0.004)


def test_subs_ignores_the_network_mask_logit_and_logit_shift():
    """SUBS normalises the logits and never predicts [MASK]: a constant shift of every logit
    (including a huge [MASK] logit) leaves the per-token losses unchanged."""
    length = 3
    x0 = sample_copy(32, length, torch.Generator().manual_seed(5))
    a = toy_model(length, CopyDenoiser())
    b = toy_model(length, CopyDenoiser(extra=7.0))
    with torch.no_grad():
        la = a.loss(x0, generator=torch.Generator().manual_seed(6)).nlls
        lb = b.loss(x0, generator=torch.Generator().manual_seed(6)).nlls
    torch.testing.assert_close(la, lb)


def _undo_t(t: torch.Tensor) -> torch.Tensor:
    return (t.double() - SAMPLING_EPS) / (1 - SAMPLING_EPS)


def _assert_stratified(u: torch.Tensor, tol: float = 1e-5):
    n = u.shape[0]
    i = torch.arange(n, dtype=torch.float64)
    assert (u >= i / n - tol).all() and (u < (i + 1) / n + tol).all(), u


def test_antithetic_t_is_stratified():
    """Element i of a batch lies in [i/n, (i+1)/n) after undoing t = eps + (1 - eps) u."""
    gen = torch.Generator().manual_seed(3)
    offsets = []
    for n in (1, 7, 64):
        for _ in range(50):
            u = _undo_t(obj.sample_t(n, "cpu", SAMPLING_EPS, True, gen))
            _assert_stratified(u)
            offsets.append(u * n - torch.arange(n))
    # The position inside each stratum is uniform: mean 1/2, variance 1/12.
    r = torch.cat(offsets)
    assert abs(float(r.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / len(r))
    assert abs(float(r.var()) - 1 / 12) < 0.01


def test_antithetic_t_is_stratified_inside_diffusion_loss():
    """The times Diffusion.loss really uses (read back from sigma through a time-conditioned
    toy) are stratified, and without antithetic sampling they are not."""
    n, length = 32, 4
    backbone = IIDDenoiser()
    model = toy_model(length, backbone, time_conditioning=True)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _ in range(20):
            model.loss(sample_iid(n, length, gen), generator=gen)
    assert len(backbone.seen_sigma) == 20
    for sigma in backbone.seen_sigma:
        t = -torch.expm1(-sigma.double()) / (1 - EPS)
        _assert_stratified(_undo_t(t))

    backbone = IIDDenoiser()
    model = toy_model(length, backbone, time_conditioning=True, antithetic_sampling=False)
    with torch.no_grad():
        model.loss(sample_iid(n, length, gen), generator=gen)
    t = -torch.expm1(-backbone.seen_sigma[0].double()) / (1 - EPS)
    u = _undo_t(t)
    i = torch.arange(n, dtype=torch.float64)
    assert not ((u >= i / n - 1e-5) & (u < (i + 1) / n + 1e-5)).all()


# --------------------------------------------------------------------- 2. discrete time


def test_discretize_grid():
    T = 10
    t = torch.tensor([0.001, 0.0999, 0.1, 0.55, 0.9999])
    torch.testing.assert_close(obj.discretize(t, T), torch.tensor([0.1, 0.1, 0.2, 0.6, 1.0]))


def test_discrete_time_closed_form_limit():
    """The exact T-step expectation exceeds the continuous bound and converges to it."""
    cont = copy_bound_continuous(2)
    gaps = [copy_bound_discrete(2, T) - cont for T in (2, 10, 100, 1000, 10000)]
    assert all(g > 0 for g in gaps)
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    # For L = 2 the gap is (1-eps)^2 (E[t_k] - E[t]) H ~ H / (2T).
    assert abs(gaps[-1] - H_PI / 2e4) < 0.1 * H_PI / 2e4


def test_discrete_time_subs_approaches_continuous_bound():
    """Monte Carlo of Diffusion.loss with T = 2, 10, 1000 on copy sequences: each agrees with
    the exact discrete expectation, the gap to the continuous closed form shrinks, and at
    T = 1000 it is within 3 standard errors plus the O(1/T) discretisation bias."""
    length = 2
    cont = copy_bound_continuous(length)
    gaps = []
    for T in (2, 10, 1000):
        model = toy_model(length, CopyDenoiser(), T=T)
        values = batch_means(model, sample_copy, n_batches=1000, batch=256, length=length,
                             seed=100 + T)
        assert_within(values, copy_bound_discrete(length, T), rel_se=0.005)
        mean, se = mean_and_se(values)
        gaps.append((abs(mean - cont), se))
    (g2, _), (g10, se10), (g1000, se1000) = gaps
    assert g2 > g10 > g1000
    assert g10 > 3 * se10  # T = 10 is still measurably above the continuous bound
    assert g1000 < 3 * se1000 + 2 * H_PI / 1000


def test_discrete_time_loss_first_grid_point_is_finite():
    """At t = 1/T (s = 0) the second term has weight 1 - dt/t = 0; under SUBS (p_m = 0) the
    per-token loss is exactly (1/t)(-log p(x0)) there, not 0 * log(0/0) = NaN."""
    T = 10
    logits = torch.randn(1, 3, V, generator=torch.Generator().manual_seed(0))
    xt = torch.tensor([[MASK, 2, MASK]])
    x0 = torch.tensor([[1, 2, 3]])
    log_p = obj.subs_parameterization(logits, xt, MASK)
    t = obj.discretize(torch.tensor([0.05]), T)
    assert float(t) == pytest.approx(1 / T)
    loss = obj.discrete_time_loss(log_p, xt, x0, t, T, MASK)
    assert torch.isfinite(loss).all()
    expected = -log_p.gather(-1, x0[:, :, None]).squeeze(-1) * T * (xt == MASK)
    torch.testing.assert_close(loss, expected)


def test_discrete_time_loss_matches_formula_with_mask_probability():
    """With p_m > 0 (D3PM-style output) the loss equals the design's formula term by term."""
    T = 20
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, V, generator=gen, dtype=torch.float64)
    log_p = torch.log_softmax(logits, -1)
    x0 = torch.randint(0, MASK, (4, 5), generator=gen)
    xt = torch.where(torch.rand(4, 5, generator=gen) < 0.5, MASK, x0)
    t = torch.tensor([0.1, 0.35, 0.5, 0.95], dtype=torch.float64)
    loss = obj.discrete_time_loss(log_p, xt, x0, t, T, MASK)
    dt = 1 / T
    p_m = log_p[..., MASK].exp()
    tt = t[:, None]
    a_t, a_s, s = 1 - tt, 1 - (tt - dt), tt - dt
    lp0 = log_p.gather(-1, x0[..., None]).squeeze(-1)
    want = T * ((dt / tt) * (torch.log(a_t * p_m / tt + 1) - lp0)
                + (1 - dt / tt) * (torch.log(a_t * p_m / tt + 1) - torch.log(a_s * p_m / s + 1)))
    torch.testing.assert_close(loss, want * (xt == MASK))


# --------------------------------------------------------------------- 3. SEDD score entropy


def _masked_batch(gen, b=6, n=10, p=0.6):
    x0 = torch.randint(0, MASK, (b, n), generator=gen)
    xt = torch.where(torch.rand(b, n, generator=gen) < p, MASK, x0)
    xt[0, 0] = MASK  # at least one masked and one unmasked position
    xt[0, 1] = x0[0, 1]
    return x0, xt


def test_score_entropy_nonnegative_for_random_scores():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x0, xt = _masked_batch(gen)
        b, n = x0.shape
        log_score = 3 * torch.randn(b, n, V, generator=gen, dtype=torch.float64)
        sigma = torch.rand(b, generator=gen, dtype=torch.float64) * 5 + 1e-3
        dsigma = torch.rand(b, generator=gen, dtype=torch.float64) + 0.1
        loss = obj.score_entropy(log_score, sigma, dsigma, xt, x0, MASK)
        masked = xt == MASK
        assert (loss[masked] >= -1e-12).all()
        assert (loss[~masked] == 0).all()
        # Generic random scores are not the optimum: the loss is strictly positive.
        assert (loss[masked] > 0).all()


def test_score_entropy_zero_at_true_score_of_point_mass():
    """Data = point mass on x0: the true ratio at a masked position is s(y) = q [y = x0],
    q = 1/(e^sigma - 1), and the loss vanishes exactly, whatever the [MASK] entry holds."""
    gen = torch.Generator().manual_seed(1)
    x0, xt = _masked_batch(gen)
    b, n = x0.shape
    sigma = torch.tensor([1e-3, 0.1, 0.5, 1.0, 3.0, 6.9], dtype=torch.float64)
    dsigma = torch.rand(b, generator=gen, dtype=torch.float64) + 0.5
    q = 1 / torch.expm1(sigma)
    for minus_inf in (-math.inf, -1e6):
        log_score = torch.full((b, n, V), minus_inf, dtype=torch.float64)
        log_score.scatter_(-1, x0[..., None], q.log()[:, None, None].expand(b, n, 1))
        log_score[..., MASK] = 4.0  # excluded from the sum
        loss = obj.score_entropy(log_score, sigma, dsigma, xt, x0, MASK)
        torch.testing.assert_close(loss, torch.zeros_like(loss), atol=1e-12, rtol=0)
        # Any other score at a masked position costs something.
        worse = log_score.clone()
        worse[..., 0] = torch.where(x0 == 0, worse[..., 0] + 0.1, q.log()[:, None] - 3.0)
        assert (obj.score_entropy(worse, sigma, dsigma, xt, x0, MASK)[xt == MASK] > 0).all()


def _expected_score_entropy(log_s_tokens: torch.Tensor, sigma: float, dsigma: float,
                            mask_entry: float = 0.0) -> torch.Tensor:
    """E_{x0 ~ pi}[score_entropy] at one masked position with scores s over the tokens,
    computed exactly by running every x0 through score_entropy and weighting by pi."""
    k = V - 1
    log_score = torch.empty(1, k, V, dtype=torch.float64)
    log_score[0, :, :MASK] = log_s_tokens
    log_score[0, :, MASK] = mask_entry
    x0 = torch.arange(k)[None]
    xt = torch.full_like(x0, MASK)
    loss = obj.score_entropy(log_score, torch.tensor([sigma], dtype=torch.float64),
                             torch.tensor([dsigma], dtype=torch.float64), xt, x0, MASK)
    return (loss[0] * PI).sum()


@pytest.mark.parametrize("sigma", [0.05, 0.7, 4.0])
def test_expected_score_entropy_minimised_at_true_ratio(sigma):
    """E_{x0~pi}[loss(s)] = sigma' (sum s - q sum pi log s + q log q - q) is minimised at
    s = q pi, where it equals sigma' q H(pi); every perturbation increases it."""
    dsigma = 1.7
    q = 1 / math.expm1(sigma)
    best_log_s = (q * PI).log()
    best = _expected_score_entropy(best_log_s, sigma, dsigma)
    assert float(best) == pytest.approx(dsigma * q * H_PI, rel=1e-10)
    # The [MASK] entry does not enter the sum.
    assert float(_expected_score_entropy(best_log_s, sigma, dsigma, mask_entry=9.0)) == \
        pytest.approx(float(best), rel=1e-12)
    # Stationary point: zero gradient with respect to the log scores.
    x = best_log_s.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_expected_score_entropy(x, sigma, dsigma), x)
    assert grad.abs().max() < 1e-9 * max(q, 1.0)
    gen = torch.Generator().manual_seed(2)
    for scale in (1e-3, 0.1, 1.0):
        for _ in range(10):
            delta = scale * torch.randn(V - 1, generator=gen, dtype=torch.float64)
            assert _expected_score_entropy(best_log_s + delta, sigma, dsigma) > best
    # Rescaling all scores (a wrong q) and using pi without q are both worse.
    for c in (0.5, 0.9, 1.1, 2.0):
        assert _expected_score_entropy(best_log_s + math.log(c), sigma, dsigma) > best
    assert _expected_score_entropy(PI.log(), sigma, dsigma) > best


def test_sedd_parameterization_log_score():
    """logits - log(e^sigma - 1) - log(V - 1), with the current token's entry set to 0."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, V, generator=gen)
    xt = torch.tensor([[MASK, 1, MASK, 2], [0, MASK, MASK, MASK], [3, 4, 5, 6]])
    sigma = torch.tensor([0.01, 0.6, 3.0])
    out = obj.sedd_parameterization(logits.clone(), xt, sigma)
    want = logits - torch.log(torch.expm1(sigma))[:, None, None] - math.log(V - 1)
    want.scatter_(-1, xt[..., None], 0.0)
    torch.testing.assert_close(out, want)


def test_sedd_bound_with_exact_score_matches_closed_form():
    """A SEDD model outputting the true log score log(q pi) of i.i.d. data: the expected
    score entropy is E_t[sigma' m(t) q H] = (1 - eps) H(pi), the MDLM bound."""
    length = 16
    # sedd_parameterization subtracts log(e^sigma - 1) + log(V - 1): add back log(V - 1).
    model = toy_model(length, IIDDenoiser(extra=math.log(V - 1)), parameterization="sedd",
                      time_conditioning=True)
    values = batch_means(model, sample_iid, n_batches=1500, batch=64, length=length, seed=20)
    assert_within(values, (1 - EPS) * H_PI, rel_se=0.004)


def test_sedd_with_exact_score_equals_subs_per_token():
    """With the exact posterior, SEDD's per-token score entropy at the true score q p(.|xt)
    equals SUBS's (1/t)(-log p(x0|xt)) on the same draws of t and x_t."""
    length = 3
    x0 = sample_copy(128, length, torch.Generator().manual_seed(7))
    subs = toy_model(length, CopyDenoiser(), time_conditioning=True)
    sedd = toy_model(length, CopyDenoiser(extra=math.log(V - 1)), parameterization="sedd",
                     time_conditioning=True)
    with torch.no_grad():
        a = subs.loss(x0, generator=torch.Generator().manual_seed(8)).nlls
        b = sedd.loss(x0, generator=torch.Generator().manual_seed(8)).nlls
    assert (a > 0).any()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------- 4. unmasked positions


def _hand_made_xt():
    x0 = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1], [2, 2, 2, 2, 2, 2]])
    xt = x0.clone()
    xt[0, [1, 3]] = MASK
    xt[1, [0, 1, 2, 5]] = MASK
    xt[2, [4]] = MASK
    return x0, xt


@pytest.mark.parametrize("kind", ["subs", "subs_discrete", "sedd"])
def test_losses_vanish_at_unmasked_positions(kind):
    torch.manual_seed(0)
    x0, xt = _hand_made_xt()
    b, n = x0.shape
    changes = {"time_conditioning": True} if kind == "sedd" else {}
    if kind == "subs_discrete":
        changes["T"] = 10
    model = Diffusion(tiny_config(n, parameterization="subs" if kind != "sedd" else "sedd",
                                  **changes)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights: the zero-initialised output layer carries signal
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    t = torch.tensor([0.1, 0.45, 0.999])  # includes the first grid point t = 1/T
    sigma, dsigma = model.noise(t)
    with torch.no_grad():
        out = model.forward(xt, sigma)
    if kind == "subs":
        loss = obj.subs_loss(out, x0, sigma, dsigma)
    elif kind == "subs_discrete":
        loss = obj.discrete_time_loss(out, xt, x0, obj.discretize(t, 10), 10, MASK)
    else:
        loss = obj.score_entropy(out, sigma, dsigma, xt, x0, MASK)
    masked = xt == MASK
    assert torch.isfinite(loss).all()
    assert (loss[~masked] == 0).all()
    assert (loss[masked] > 0).all()
    # The whole pipeline agrees: diffusion_losses at fixed t is zero wherever x_t kept x0
    # (x_t is redrawn here from the same generator state to find those positions).
    t_used = obj.discretize(t, 10) if kind == "subs_discrete" else t
    move_chance = model.noise.move_chance(t_used)[:, None]
    xt_drawn = obj.q_xt(x0, move_chance, MASK, torch.Generator().manual_seed(1))
    with torch.no_grad():
        per_token = model.diffusion_losses(x0, t, torch.Generator().manual_seed(1))
    assert torch.isfinite(per_token).all()
    assert (per_token[xt_drawn != MASK] == 0).all()
    assert (per_token[xt_drawn == MASK] > 0).all()
