"""Ordered unmasking unmasks exactly the scheduled number of positions per step, in score
order; ReMDM remasks with its stated probabilities and ends with no [MASK]."""

import math

import pytest
import torch

from model import Diffusion
from sampling import Knobs, sample
from sampling.ordered import schedule
from tests.conftest import randomize_, tiny_config

L, V = 12, 9  # positions, tokens; [MASK] = V
TABLE = torch.softmax(3 * torch.randn(L, V, generator=torch.Generator().manual_seed(7),
                                      dtype=torch.float64), -1)


class ByPosition(torch.nn.Module):
    """p_theta at position j is TABLE[j] whatever the context; records every input."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.inputs = []

    def forward(self, x, sigma=None, positions=None):
        self.inputs.append(x.clone())
        out = torch.full((*x.shape, V + 1), -1e4)
        out[..., :V] = TABLE.log().float()
        return out if positions is None else out[positions]


def by_position_model():
    model = Diffusion(tiny_config(vocab_size=V + 1, mask_index=V, length=L))
    model.backbone = ByPosition()
    return model.eval()


def expected_order(kind: str) -> list[int]:
    p = TABLE.float().double()
    top = p.topk(2, -1).values
    score = {"confidence": top[:, 0], "margin": top[:, 0] - top[:, 1],
             "entropy": (p * p.log()).sum(-1)}[kind]
    return score.argsort(descending=True).tolist()


def unmasked_each_step(model, final):
    """Positions that unmasked between consecutive network calls (and after the last)."""
    states = model.backbone.inputs + [final]
    return [[torch.nonzero((a[r] == V) & (b[r] != V)).squeeze(1).tolist()
             for r in range(a.shape[0])] for a, b in zip(states, states[1:])]


def test_schedules_sum_to_the_masked_count():
    assert schedule(12, 4, "linear") == [3, 3, 3, 3]
    assert sum(schedule(1000, 37, "cosine")) == 1000 == sum(schedule(1000, 37, "linear"))
    cosine = schedule(1000, 10, "cosine")
    assert cosine == sorted(cosine) and cosine[0] < 100 < cosine[-1]  # slow start
    assert schedule(3, 5, "linear").count(0) == 2  # more steps than positions


@pytest.mark.parametrize("kind", ["confidence", "margin", "entropy"])
@pytest.mark.parametrize("steps,unmask_schedule", [(4, "linear"), (5, "cosine"),
                                                   (20, "linear")])
def test_ordered_unmasks_the_scheduled_count_in_score_order(kind, steps, unmask_schedule):
    model = by_position_model()
    x, nfe = sample(model, 3, L, steps=steps, predictor=kind, unmask_schedule=unmask_schedule,
                    generator=torch.Generator().manual_seed(0))
    counts = [k for k in schedule(L, steps, unmask_schedule) if k > 0]
    assert nfe == len(counts) and bool((x != V).all())
    order, done = expected_order(kind), 0
    for k, rows in zip(counts, unmasked_each_step(model, x)):
        for positions in rows:  # every row: the next k positions in score order
            assert sorted(positions) == sorted(order[done:done + k])
        done += k


@pytest.mark.parametrize("kind", ["random", "confidence"])
def test_random_order_and_order_temperature_keep_the_counts(kind):
    model = by_position_model()
    x, nfe = sample(model, 64, L, steps=4, predictor=kind, order_temperature=5.0,
                    generator=torch.Generator().manual_seed(0))
    steps = unmasked_each_step(model, x)
    assert nfe == 4 and all(len(p) == 3 for rows in steps for p in rows)
    firsts = {tuple(sorted(rows[0])) for rows in zip(*steps)}
    assert len(firsts) > 10  # the order varies from row to row


def test_ordered_tokens_follow_p_theta():
    model = by_position_model()
    x, _ = sample(model, 3000, L, steps=3, predictor="margin",
                  generator=torch.Generator().manual_seed(1))
    counts = torch.nn.functional.one_hot(x[:, 0], V).sum(0).double()
    law = TABLE[0]
    keep = law * 3000 > 5
    stat = float(((counts[keep] - 3000 * law[keep]) ** 2 / (3000 * law[keep])).sum())
    assert stat < 27.9 and float(counts[~keep].sum()) < 40  # 9 d.o.f. at most, p = 0.001


def test_confidence_threshold_unmasks_every_position_above_it_and_one_at_least():
    threshold = float(TABLE.max(-1).values.sort().values[-4])  # three positions above it
    model = by_position_model()
    x, nfe = sample(model, 2, L, steps=4, predictor="confidence",
                    confidence_threshold=threshold, generator=torch.Generator().manual_seed(0))
    steps = unmasked_each_step(model, x)
    order = expected_order("confidence")
    assert nfe == 1 + (L - 3) and bool((x != V).all())
    assert sorted(steps[0][0]) == sorted(order[:3])
    assert [rows[0] for rows in steps[1:]] == [[j] for j in order[3:]]


# ------------------------------------------------------------------------------- ReMDM
def test_remdm_defaults_are_the_papers_protocol():
    assert Knobs(predictor="remdm-loop").remdm_eta == 0.02
    assert Knobs(predictor="remdm-cap").remdm_eta == 0.008
    assert Knobs(predictor="remdm-rescale").remdm_eta == 0.015
    k = Knobs()
    assert (k.t_on, k.t_off, k.alpha_on) == (0.55, 0.05, 0.9)


def test_loop_phase_remasks_with_probability_eta(monkeypatch):
    """In the loop (t_off < t <= t_on) an unmasked token is remasked with probability eta
    and a masked one unmasks with probability alpha_on eta / (1 - alpha_on)."""
    import sampling.remdm as remdm

    eta, seen = 0.1, []
    real = remdm.remask_step

    def spy(state, p_x0, alpha_t, alpha_s, sigma):
        new = real(state, p_x0, alpha_t, alpha_s, sigma)
        seen.append((alpha_t, alpha_s, sigma, state.x.clone(), new.clone()))
        return new

    monkeypatch.setattr(remdm, "remask_step", spy)
    model = by_position_model()
    x, _ = sample(model, 300, L, steps=100, predictor="remdm-loop", eta=eta,
                  generator=torch.Generator().manual_seed(0))
    times = torch.linspace(1, 1e-5, 101).tolist()[:100]
    assert len(seen) == sum(0.05 < t <= 0.55 for t in times)
    assert all((a, b, s) == (0.9, 0.9, eta) for a, b, s, _, _ in seen)
    before = torch.stack([s[3] for s in seen])
    after = torch.stack([s[4] for s in seen])
    clean, masked = before != V, before == V
    remasked = float((clean & (after == V)).sum() / clean.sum())
    n = float(clean.sum())
    assert abs(remasked - eta) < 4 * math.sqrt(eta * (1 - eta) / n), remasked
    unmasked = float((masked & (after != V)).sum() / masked.sum())
    rate = 0.9 * eta / 0.1
    assert abs(unmasked - rate) < 4 * math.sqrt(rate * (1 - rate) / float(masked.sum()))
    kept = clean & (after != V)
    assert torch.equal(after[kept], before[kept])  # a token is kept or remasked, never changed
    assert bool((x != V).all())


@pytest.mark.parametrize("predictor", ["remdm-cap", "remdm-rescale", "remdm-conf",
                                       "remdm-loop"])
def test_remdm_ends_with_no_mask_and_keeps_the_prefix(predictor):
    model = randomize_(Diffusion(tiny_config(length=16)), std=0.1).eval()
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 22, (8, 6), generator=g)
    x, nfe = sample(model, 8, 16, steps=64, predictor=predictor, eta=0.1, prefix=prefix,
                    top_p=0.9, generator=g)
    assert bool((x != 22).all()) and torch.equal(x[:, :6], prefix) and 0 < nfe <= 65


@pytest.mark.parametrize("predictor", ["remdm-cap", "remdm-rescale"])
def test_remdm_with_eta_zero_is_mdlm(predictor):
    model = randomize_(Diffusion(tiny_config()), std=0.3).eval()
    ours = sample(model, 4, 12, steps=20, predictor=predictor, eta=0.0,
                  generator=torch.Generator().manual_seed(3))
    mdlm = sample(model, 4, 12, steps=20, predictor="ddpm_cache",
                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours[0], mdlm[0]) and ours[1] == mdlm[1]


def test_remdm_cap_and_rescale_choose_sigma_as_the_paper(monkeypatch):
    import sampling.remdm as remdm

    seen = []
    real = remdm.remask_step
    monkeypatch.setattr(remdm, "remask_step", lambda state, p, a_t, a_s, sigma: (
        seen.append((a_t, a_s, sigma)) or real(state, p, a_t, a_s, sigma)))
    model = randomize_(Diffusion(tiny_config()), std=0.3).eval()
    for predictor, eta in (("remdm-cap", 0.3), ("remdm-rescale", 0.5)):
        seen.clear()
        sample(model, 2, 12, steps=10, predictor=predictor, eta=eta,
               generator=torch.Generator().manual_seed(0))
        for a_t, a_s, sigma in seen:
            sigma_max = min(1.0, (1 - a_s) / a_t) if a_t > 0 else 1.0
            want = (min(eta, (1 - a_s) / a_t) if a_t > 0 else eta) \
                if predictor == "remdm-cap" else eta * sigma_max
            assert sigma == pytest.approx(want)
        assert len(seen) == 10
