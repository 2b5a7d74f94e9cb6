"""The samplers' memory stays bounded at release sizes, and bounding it changed no draw."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sampling.categorical as categorical
from model import Diffusion
from sampling import ar_sample, sample, sample_categorical
from tests.conftest import randomize_, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def one_draw(probs, generator, gumbel_dtype):
    """The draw over the whole tensor at once (the release's, and this module's before)."""
    dtype = categorical.DTYPES[gumbel_dtype]
    u = torch.rand(probs.shape, generator=generator, dtype=dtype)
    return (probs.to(dtype) / (1e-10 - (u + 1e-10).log())).argmax(dim=-1)


@pytest.mark.parametrize("gumbel_dtype", ["float64", "float32"])
@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 97, 700, 1 << 23])
def test_chunked_draw_gives_the_tokens_of_one_draw(monkeypatch, gumbel_dtype, probs_dtype,
                                                   chunk_elements):
    monkeypatch.setattr(categorical, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 41, 97, generator=g).pow(8).to(probs_dtype)
    ours = sample_categorical(probs, torch.Generator().manual_seed(5), gumbel_dtype)
    assert ours.shape == (3, 41)
    assert torch.equal(ours, one_draw(probs, torch.Generator().manual_seed(5), gumbel_dtype))


def test_a_cpu_generator_yields_one_draws_numbers_in_row_chunks():
    """What the chunked draw relies on: contiguous chunks reproduce one draw's numbers."""
    whole = torch.rand(50, 33, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    parts = [torch.rand(n, 33, generator=g, dtype=torch.float64) for n in (7, 1, 30, 12)]
    assert torch.equal(torch.cat(parts), whole)


def test_non_contiguous_probabilities_draw_as_their_contiguous_copy(monkeypatch):
    monkeypatch.setattr(categorical, "CHUNK_ELEMENTS", 64)
    probs = torch.rand(23, 5, 9, generator=torch.Generator().manual_seed(2)).transpose(0, 1)
    a = sample_categorical(probs, torch.Generator().manual_seed(3))
    b = sample_categorical(probs.contiguous(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_each_chunk_stays_under_the_element_budget(monkeypatch):
    budget, shapes = 1000, []
    probs = torch.rand(4, 64, 120)
    real_rand = torch.rand

    def spy(shape, *args, **kwargs):
        shapes.append(tuple(shape))
        return real_rand(shape, *args, **kwargs)

    monkeypatch.setattr(categorical, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(torch, "rand", spy)
    sample_categorical(probs)
    assert len(shapes) > 1 and sum(r for r, _ in shapes) == 4 * 64
    assert all(r * v <= budget for r, v in shapes)


PEAK = """
import resource, sys, torch
import sampling.categorical as categorical
categorical.CHUNK_ELEMENTS = 1 << 20  # 8 MiB of float64 noise
probs = torch.rand(16, 64, 8192)  # 8M entries: 64 MiB per float64 temporary
g = torch.Generator().manual_seed(0)
categorical.sample_categorical(probs[:2], g)  # warm up: threads, allocator, kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
categorical.sample_categorical(probs, g)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_peak_memory_of_a_draw_is_bounded_by_the_chunk_not_the_batch():
    """Peak resident memory of a draw over 8M entries, with 8 MiB chunks: one draw of the
    whole tensor holds several 64 MiB float64 temporaries (240 MiB above the start); the
    chunked draw stays within a few chunks (16 to 32 MiB, as the allocator keeps them)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(PEAK)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    extra_mib = float(done.stdout.strip().splitlines()[-1])
    assert extra_mib < 64, f"a chunked draw grew the peak memory by {extra_mib:.0f} MiB"


def test_ar_sampler_draws_each_steps_noise_not_all_steps_up_front(monkeypatch):
    import sampling.autoregressive as autoregressive

    shapes = []
    real = autoregressive.gumbel_noise

    def spy(shape, *args, **kwargs):
        shapes.append(tuple(shape))
        return real(shape, *args, **kwargs)

    monkeypatch.setattr(autoregressive, "gumbel_noise", spy)
    model = randomize_(Diffusion(tiny_config(backbone="ar", parameterization="ar", length=16)),
                       std=0.3).eval()
    x, _ = ar_sample(model, 3, 16, bos_index=1, generator=torch.Generator().manual_seed(0))
    assert shapes == [(3, 23)] * 15
    # a given noise tensor is used as it is: the tokens of its per-step slices
    g = torch.Generator().manual_seed(0)
    noise = torch.stack([real((3, 23), g, "cpu") for _ in range(15)], dim=1)
    given, _ = ar_sample(model, 3, 16, bos_index=1, noise=noise)
    assert torch.equal(given, x)


def test_ar_gumbel_noise_is_the_standard_gumbel_transform():
    import sampling.autoregressive as autoregressive

    u = torch.rand(4, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
    ours = autoregressive.gumbel_noise((4, 50), torch.Generator().manual_seed(4), "cpu")
    assert torch.equal(ours, expected)


def test_analytic_transition_needs_no_int64_one_hot():
    from sampling.diffusion import _transposed_transition

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 23, (4, 12), generator=g)
    sigma = torch.rand(4, generator=g)
    stay = torch.exp(-sigma)[:, None, None]
    expected = stay * F.one_hot(x, num_classes=23)
    expected += torch.where(x == 22, 1 - stay[..., 0], 0)[..., None]
    assert torch.equal(_transposed_transition(x, sigma, 23, 22), expected)


def test_fast_sampler_groups_positions_with_one_nonzero_call(monkeypatch):
    from sampling.fast import _positions_by_step

    g = torch.Generator().manual_seed(0)
    when = torch.randint(-1, 9, (5, 13), generator=g)
    expected = [torch.nonzero(when == s, as_tuple=True)
                for s in torch.unique(when[(when >= 0) & (when < 8)]).tolist()]
    got = list(_positions_by_step(when, 8))
    assert len(got) == len(expected)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(expected, got))
    # a host synchronization per network call before: one nonzero per unmasking step
    calls, real = [], torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = randomize_(Diffusion(tiny_config()), std=0.1).eval()
    _, nfe = sample(model, 2, 12, steps=20, predictor="ddpm_fast", noise_removal=False,
                    generator=torch.Generator().manual_seed(1))
    assert nfe > 5 and len(calls) == 1, (nfe, len(calls))
