import math

import pytest
import torch

from model import Diffusion
from sampling import ar_sample, sample, semi_ar_sample
from tests.conftest import randomize_, tiny_config

# A two-token toy: joint P(a, b) over 3 tokens, [MASK] = 3. The exact denoiser returns the
# conditional of a position given the other when that one is visible, else its marginal.
JOINT = torch.tensor([[0.30, 0.05, 0.05],
                      [0.02, 0.20, 0.08],
                      [0.10, 0.05, 0.15]], dtype=torch.float64)
MASK = 3
CRITICAL_DF8 = 26.12  # chi-square, 8 degrees of freedom, p = 0.001


class ToyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x, sigma=None, positions=None):
        p1, p2 = JOINT.sum(1), JOINT.sum(0)
        given_b = torch.cat([(JOINT / JOINT.sum(0)).T, p1[None]])  # row b: P(a | b); MASK
        given_a = torch.cat([JOINT / JOINT.sum(1, keepdim=True), p2[None]])  # row a: P(b | a)
        out = torch.zeros(*x.shape, 4, dtype=torch.float64)
        out[:, 0, :3] = given_b[x[:, 1]]
        out[:, 1, :3] = given_a[x[:, 0]]
        out = out.clamp_min(1e-30).log().float()
        return out if positions is None else out[positions]


def toy_model():
    model = Diffusion(tiny_config(vocab_size=4, mask_index=MASK, length=2))
    model.backbone = ToyDenoiser()
    return model.eval()


def expected(steps: int) -> torch.Tensor:
    """Both positions unmask at the same step with probability T dt^2 (then independently
    from the marginals), otherwise one after the other (then from the joint)."""
    dt = (1 - 1e-5) / steps
    same = steps * dt * dt
    product = JOINT.sum(1)[:, None] * JOINT.sum(0)[None, :]
    return ((1 - same) * JOINT + same * product).reshape(-1)


def histogram(tokens: torch.Tensor) -> torch.Tensor:
    assert bool((tokens < 3).all())
    return torch.bincount(tokens[:, 0] * 3 + tokens[:, 1], minlength=9).double()


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    return float(((counts - n * probs) ** 2 / (n * probs)).sum())


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("predictor", ["ddpm", "ddpm_cache", "ddpm_fast", "analytic"])
def test_every_predictor_draws_the_closed_form_law(predictor, steps):
    model = toy_model()
    g = torch.Generator().manual_seed(11)
    tokens = torch.cat([sample(model, 1000, 2, steps=steps, predictor=predictor,
                               generator=g)[0] for _ in range(6)])
    stat = chi2(histogram(tokens), expected(steps))
    assert stat < CRITICAL_DF8, stat
    if steps == 1:  # one step: each position follows p(x0 | all masked), independently
        assert chi2(histogram(tokens), JOINT.reshape(-1)) > 5 * CRITICAL_DF8


def test_fast_sampler_nfe_matches_the_formula():
    class Uniform(torch.nn.Module):  # the count does not depend on the network
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

        def forward(self, x, sigma=None, positions=None):
            out = torch.zeros(*x.shape, 23)
            return out if positions is None else out[positions]

    model = Diffusion(tiny_config(length=64)).eval()
    model.backbone = Uniform()
    g = torch.Generator().manual_seed(0)
    steps, length, eps = 100, 64, 1e-5
    nfes = torch.tensor([sample(model, 1, length, steps=steps, predictor="ddpm_fast",
                                noise_removal=False, generator=g)[1] for _ in range(300)],
                        dtype=torch.float64)
    formula = steps * (1 - (1 - 1 / steps) ** length)
    exact = steps * (1 - (1 - (1 - eps) / steps) ** length)
    stderr = nfes.std() / math.sqrt(len(nfes))
    assert abs(nfes.mean() - exact) < 4 * stderr and abs(exact - formula) < 0.01
    # ddpm calls the network at every step
    assert sample(model, 1, length, steps=20, predictor="ddpm", generator=g)[1] == 21


def test_fast_sampler_refuses_what_it_cannot_sample_exactly():
    model = Diffusion(tiny_config(time_conditioning=True)).eval()
    with pytest.raises(ValueError, match="without time conditioning"):
        sample(model, 1, 12, steps=4, predictor="ddpm_fast")
    model = Diffusion(tiny_config(parameterization="d3pm", T=10)).eval()
    with pytest.raises(ValueError, match="parameterization=subs"):
        sample(model, 1, 12, steps=4, predictor="ddpm_fast")


def test_fast_sampler_projects_only_the_unmasking_rows(rng):
    from model.dit import DIT

    dit = randomize_(DIT(tiny_config()), std=0.1).eval()
    x = torch.randint(0, 23, (3, 12), generator=rng)
    rows, cols = torch.tensor([0, 2, 2]), torch.tensor([5, 0, 11])
    full = dit(x, None)
    torch.testing.assert_close(dit(x, None, positions=(rows, cols)), full[rows, cols])


def test_prefix_and_semi_ar_lengths():
    model = randomize_(Diffusion(tiny_config()), std=0.1).eval()
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 22, (3, 5), generator=g)
    x, _ = sample(model, 3, 12, steps=10, prefix=prefix, generator=g)
    assert torch.equal(x[:, :5], prefix) and bool((x != 22).all())
    out, nfe = semi_ar_sample(model, 2, 12, stride_length=4, num_strides=3, steps=10,
                              generator=g)
    assert out.shape == (2, 12 + 3 * 4) and nfe > 0 and bool((out != 22).all())


def test_semi_ar_windows_keep_their_prefix(monkeypatch):
    import sampling.semi_ar as semi

    calls = []
    real = semi.sample

    def spy(model, batch_size, length, prefix=None, **kw):
        x, nfe = real(model, batch_size, length, prefix=prefix, **kw)
        calls.append((prefix, x))
        return x, nfe

    monkeypatch.setattr(semi, "sample", spy)
    model = randomize_(Diffusion(tiny_config()), std=0.1).eval()
    out, _ = semi.semi_ar_sample(model, 2, 12, 4, 2, steps=6,
                                 generator=torch.Generator().manual_seed(0))
    (_, w0), (p1, w1), (p2, w2) = calls
    assert torch.equal(p1, w0[:, 4:]) and torch.equal(w1[:, :8], p1)
    assert torch.equal(p2, w1[:, 4:]) and torch.equal(w2[:, :8], p2)
    assert torch.equal(out, torch.cat([w0, w1[:, 8:], w2[:, 8:]], dim=1))


def test_ar_kv_cache_gives_the_tokens_of_full_recomputation():
    model = randomize_(Diffusion(tiny_config(backbone="ar", parameterization="ar", length=24)),
                       std=0.3).eval()
    cached, nfe = ar_sample(model, 4, 24, bos_index=1, generator=torch.Generator().manual_seed(3))
    full, _ = ar_sample(model, 4, 24, bos_index=1, generator=torch.Generator().manual_seed(3),
                        use_cache=False)
    assert torch.equal(cached, full) and nfe == 23
    assert bool((cached[:, 0] == 1).all()) and bool((cached != 22).all())


def test_float32_gumbel_reproduces_the_release_draw():
    from sampling import sample_categorical

    probs = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(9)
    ours = sample_categorical(probs, g, "float32")
    g = torch.Generator().manual_seed(9)
    gumbel_norm = 1e-10 - (torch.rand(probs.shape, generator=g) + 1e-10).log()
    assert torch.equal(ours, (probs / gumbel_norm).argmax(-1))


def test_stop_after_times_the_first_steps_of_a_long_schedule():
    model = randomize_(Diffusion(tiny_config()), std=0.1).eval()
    x, nfe = sample(model, 2, 12, steps=1000, predictor="ddpm", noise_removal=False,
                    stop_after=5, generator=torch.Generator().manual_seed(0))
    assert nfe == 5 and bool((x == 22).any())
