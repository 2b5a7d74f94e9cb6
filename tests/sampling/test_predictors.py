"""The predictors added since the release: exact laws on the two-token toy (chi-square with
fixed seeds), nucleus and temperature on a model with a known distribution, and
first_hitting's network calls."""

import pytest
import torch

from model import Diffusion
from sampling import PREDICTORS, ar_sample, sample
from sampling.warp import warp
from tests.conftest import randomize_, tiny_config
from tests.sampling.test_samplers import CRITICAL_DF8, JOINT, chi2, expected, histogram, toy_model

V = 6  # tokens of the fixed-distribution model; [MASK] = 6
FIXED = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04], dtype=torch.float64)


class Fixed(torch.nn.Module):
    """Every position's p_theta is FIXED, whatever the context (SUBS keeps clean tokens)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x, sigma=None, positions=None):
        out = torch.full((*x.shape, V + 1), -1e4)
        out[..., :V] = FIXED.log().float()
        return out if positions is None else out[positions]


def fixed_model(length=8, **changes):
    model = Diffusion(tiny_config(vocab_size=V + 1, mask_index=V, length=length, **changes))
    model.backbone = Fixed()
    return model.eval()


def sequential_law(temperature=1.0, top_p=1.0) -> torch.Tensor:
    """The toy's law when its two positions unmask one after the other, the first uniform
    among the two, each from the warped p_theta given the other's state."""
    p1, p2 = JOINT.sum(1), JOINT.sum(0)

    def w(p):
        return warp(p, temperature, top_p)

    first_a = w(p1)[:, None] * w(JOINT / JOINT.sum(1, keepdim=True))  # a, then b | a
    first_b = (w(p2)[:, None] * w((JOINT / JOINT.sum(0)).T)).T  # b, then a | b
    return (0.5 * first_a + 0.5 * first_b).reshape(-1)


def toy_draws(predictor, n_batches=6, **knobs):
    g = torch.Generator().manual_seed(11)
    return torch.cat([sample(toy_model(), 1000, 2, predictor=predictor, generator=g,
                             **knobs)[0] for _ in range(n_batches)])


def test_first_hitting_draws_the_joint_exactly():
    tokens = toy_draws("first_hitting")
    assert chi2(histogram(tokens), JOINT.reshape(-1)) < CRITICAL_DF8
    # the one-step (independent) law is far: the test can tell them apart
    product = (JOINT.sum(1)[:, None] * JOINT.sum(0)[None, :]).reshape(-1)
    assert chi2(histogram(tokens), product) > 5 * CRITICAL_DF8


def test_ddpm_fast_with_many_steps_has_first_hittings_law():
    """Both positions of a row unmask at the same step of ddpm_fast with probability
    T dt^2 ~ 1 / T: at T = 1000, a weight of 1e-3 on the product law, far below what 5000
    draws can see (a chi-square shift of about 0.005); the network is called once per
    distinct step."""
    g = torch.Generator().manual_seed(5)
    fast = histogram(sample(toy_model(), 5000, 2, predictor="ddpm_fast", steps=1000,
                            generator=g)[0])
    hitting = histogram(sample(toy_model(), 5000, 2, predictor="first_hitting",
                               generator=g)[0])
    assert chi2(fast, expected(1000)) < CRITICAL_DF8
    assert chi2(fast, JOINT.reshape(-1)) < CRITICAL_DF8
    # two-sample homogeneity: the pooled law fits both histograms
    pooled = (fast + hitting) / (fast + hitting).sum()
    stat = chi2(fast, pooled) + chi2(hitting, pooled)
    assert stat < CRITICAL_DF8, stat
    # and at few steps ddpm_fast is measurably not that law
    assert chi2(histogram(toy_draws("ddpm_fast", steps=1)), JOINT.reshape(-1)) > CRITICAL_DF8


@pytest.mark.parametrize("predictor", ["ddpm", "ddpm_cache", "ddpm_fast", "analytic"])
def test_top_p_one_leaves_every_law_and_draw_unchanged(predictor):
    tokens = toy_draws(predictor, steps=4, top_p=1.0, temperature=1.0)
    assert chi2(histogram(tokens), expected(4)) < CRITICAL_DF8
    assert torch.equal(tokens, toy_draws(predictor, steps=4))  # bit for bit
    p = torch.rand(5, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p /= p.sum(-1, keepdim=True)
    assert torch.equal(warp(p, 1.0, 1.0), p)


@pytest.mark.parametrize("knobs", [dict(temperature=0.5), dict(temperature=2.0),
                                   dict(top_p=0.5), dict(top_p=0.7, temperature=0.8)])
def test_first_hitting_draws_the_warped_sequential_law(knobs):
    tokens = toy_draws("first_hitting", **knobs)
    law = sequential_law(**knobs)
    support = law > 0
    counts = histogram(tokens)
    assert float(counts[~support].sum()) == 0  # nothing outside the nucleus
    stat = chi2(counts[support], law[support])
    assert stat < CRITICAL_DF8, stat
    assert chi2(counts, JOINT.reshape(-1)) > 5 * CRITICAL_DF8  # the warp is visible


def test_nucleus_keeps_the_most_probable_tokens_up_to_top_p():
    p = FIXED[None]
    assert torch.equal(warp(p, top_p=0.8) > 0, torch.tensor([[1, 1, 1, 0, 0, 0]]).bool())
    assert torch.equal(warp(p, top_p=0.1) > 0, torch.tensor([[1, 0, 0, 0, 0, 0]]).bool())
    torch.testing.assert_close(warp(p, top_p=0.65)[0, :2], FIXED[:2] / 0.6)
    tempered = warp(p, temperature=0.5)
    torch.testing.assert_close(tempered, p ** 2 / (p ** 2).sum())
    # a tiny temperature does not underflow to all zeros
    assert torch.equal(warp(p, temperature=1e-4), torch.tensor([[1.0, 0, 0, 0, 0, 0]]).double())


@pytest.mark.parametrize("predictor", sorted(PREDICTORS))
def test_nucleus_never_draws_outside_the_top_p_set(predictor):
    """top_p = 0.85 keeps tokens 0, 1, 2 (cumulative 0.35, 0.6, 0.8); 3 (0.9) is out."""
    model = fixed_model(length=16)
    tokens, _ = sample(model, 64, 16, steps=8, predictor=predictor, top_p=0.85,
                       generator=torch.Generator().manual_seed(0))
    assert int(tokens.max()) <= 2 and bool((tokens >= 0).all())
    if predictor in ("first_hitting", "ddpm_fast", "ddpm", "ddpm_cache"):
        counts = torch.bincount(tokens.reshape(-1), minlength=3).double()
        law = FIXED[:3] / FIXED[:3].sum()
        stat = float(((counts - counts.sum() * law) ** 2 / (counts.sum() * law)).sum())
        assert stat < 13.82, stat  # 2 degrees of freedom, p = 0.001


def test_ar_nucleus_and_temperature():
    class FixedAR(Fixed):
        def forward(self, x, sigma=None):
            out = torch.full((*x.shape, V + 1), -1e4)
            out[..., :V] = FIXED.log().float()
            return out.log_softmax(-1)

    model = Diffusion(tiny_config(backbone="ar", parameterization="ar", vocab_size=V + 1,
                                  mask_index=V, length=40)).eval()
    model.backbone = FixedAR()
    tokens, _ = ar_sample(model, 200, 40, bos_index=0, use_cache=False, top_p=0.85,
                          generator=torch.Generator().manual_seed(0))
    assert int(tokens[:, 1:].max()) <= 2
    tokens, _ = ar_sample(model, 200, 40, bos_index=0, use_cache=False, temperature=0.5,
                          generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens[:, 1:].reshape(-1), minlength=V).double()
    law = FIXED ** 2 / (FIXED ** 2).sum()
    stat = float(((counts - counts.sum() * law) ** 2 / (counts.sum() * law)).sum())
    assert stat < 20.52, stat  # 5 degrees of freedom, p = 0.001


def test_ar_cache_matches_recomputation_under_nucleus_and_temperature():
    model = randomize_(Diffusion(tiny_config(backbone="ar", parameterization="ar", length=24)),
                       std=0.3).eval()
    kw = dict(bos_index=1, top_p=0.7, temperature=0.8)
    cached, _ = ar_sample(model, 4, 24, generator=torch.Generator().manual_seed(3), **kw)
    full, _ = ar_sample(model, 4, 24, generator=torch.Generator().manual_seed(3),
                        use_cache=False, **kw)
    assert torch.equal(cached, full)


def test_first_hitting_calls_the_network_once_per_unmasked_position(monkeypatch):
    import sampling.fast as fast
    import sampling.first_hitting as first_hitting

    model = randomize_(Diffusion(tiny_config(length=40)), std=0.1).eval()
    unmasked_per_call, real = [], fast.token_probs

    def spy(state, rows, cols):
        unmasked_per_call.append((len(rows), int((state.x == 22).sum())))
        return real(state, rows, cols)

    monkeypatch.setattr(first_hitting, "token_probs", spy)
    g = torch.Generator().manual_seed(0)
    x, nfe = sample(model, 3, 40, predictor="first_hitting", noise_removal=False,
                    generator=g)
    assert nfe == 40 == len(unmasked_per_call) and bool((x != 22).all())
    # each call unmasks one position in each row: 3 rows, 120 .. 3 masked before it
    assert unmasked_per_call == [(3, 3 * (40 - i)) for i in range(40)]
    prefix = torch.randint(0, 22, (3, 15), generator=g)
    x, nfe = sample(model, 3, 40, predictor="first_hitting", prefix=prefix, generator=g)
    assert nfe == 25 and torch.equal(x[:, :15], prefix) and bool((x != 22).all())


def test_first_hitting_stops_below_eps_and_leaves_the_rest_to_noise_removal():
    model = randomize_(Diffusion(tiny_config(length=40)), std=0.1).eval()
    x, nfe = sample(model, 2, 40, predictor="first_hitting", eps=0.5, noise_removal=False,
                    generator=torch.Generator().manual_seed(0))
    left = (x == 22).sum(-1)
    # a position is still masked at t = 0.5 with probability one half
    assert 5 < int(left.float().mean()) < 35 and nfe == 40 - int(left.min())
    done, _ = sample(model, 2, 40, predictor="first_hitting", eps=0.5,
                     generator=torch.Generator().manual_seed(0))
    assert bool((done != 22).all())
