import math

import pytest
import torch

from model import ConfigError, get_noise
from model.noise import LogLinear

ALL = [{"type": "loglinear"}, {"type": "linear", "sigma_min": 1e-3, "sigma_max": 7.0},
       {"type": "geometric", "sigma_min": 1e-3, "sigma_max": 1.0}, {"type": "cosine"},
       {"type": "cosinesqr"}]


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s["type"])
def test_rate_is_the_derivative_of_total_noise(spec):
    schedule = get_noise(spec)
    t = torch.linspace(0.01, 0.99, 41, dtype=torch.float64, requires_grad=True)
    total, rate = schedule(t)
    (grad,) = torch.autograd.grad(total.sum(), t)
    torch.testing.assert_close(rate.detach().expand_as(grad), grad, rtol=1e-6, atol=1e-9)
    assert torch.all(total[1:] > total[:-1])  # noise grows with t


def test_loglinear_closed_forms():
    schedule = LogLinear(eps=1e-3)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(schedule.move_chance(t), (1 - 1e-3) * t)
    sigma, dsigma = schedule(t[1:])
    torch.testing.assert_close(dsigma / torch.expm1(sigma), 1 / t[1:])  # the MDLM weight 1/t
    assert schedule.sigma_max == pytest.approx(-math.log(1e-3))
    assert schedule.sigma_min == pytest.approx(1e-3)


@pytest.mark.parametrize("spec", ALL[:2], ids=lambda s: s["type"])
def test_importance_sampling_makes_log_masking_probability_linear(spec):
    schedule = get_noise(spec)
    u = torch.linspace(0, 1, 21, dtype=torch.float64)
    t = schedule.importance_sampling_transformation(u)
    assert torch.all(t[1:] > t[:-1])
    f = torch.log1p(-torch.exp(-schedule.total(t)))
    f_0 = math.log1p(-math.exp(-schedule.sigma_min))
    f_T = math.log1p(-math.exp(-schedule.sigma_max))
    # the bounds are float32 constants, as in the release
    torch.testing.assert_close(f, f_0 + u * (f_T - f_0), rtol=1e-5, atol=2e-5)


def test_unknown_schedule():
    with pytest.raises(ConfigError, match="noise.type='cosin'"):
        get_noise({"type": "cosin"})
