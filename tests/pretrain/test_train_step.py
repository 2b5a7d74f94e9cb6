"""The pieces of the training step that run outside DeepSpeed (fast, no processes)."""

import types

import torch

from pretrain.ds_config import loop_clips
from pretrain.train import _clip, _grad_norm


def fake_engine(seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale
    return types.SimpleNamespace(module=module)


def test_the_loop_clips_as_torch_does():
    for scale in (0.01, 10.0):  # below and above the threshold
        ours, reference = fake_engine(0, scale), fake_engine(0, scale)
        norm = _grad_norm(ours)
        _clip(ours, 1.0, float(norm))
        expected = torch.nn.utils.clip_grad_norm_(reference.module.parameters(), 1.0)
        torch.testing.assert_close(norm, expected)
        for a, b in zip(ours.module.parameters(), reference.module.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_the_norm_leaves_gradients_alone_and_flags_nan():
    engine = fake_engine(1, 10.0)
    before = [p.grad.clone() for p in engine.module.parameters()]
    norm = _grad_norm(engine)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, engine.module.parameters()))
    assert norm > 1
    next(engine.module.parameters()).grad[0, 0] = float("nan")
    assert not torch.isfinite(_grad_norm(engine))


def test_fp16_gradients_do_not_overflow_the_norm():
    engine = types.SimpleNamespace(module=torch.nn.Linear(100, 100).half())
    for p in engine.module.parameters():
        p.grad = torch.full_like(p, 1000.0)  # finite, but an fp16 norm would be inf
    assert torch.isfinite(_grad_norm(engine))


def test_who_clips():
    base = {"gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
            "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert loop_clips(base)
    assert not loop_clips({**base, "gradient_clipping": 0.0})
    assert not loop_clips({**base, "zero_optimization": {"stage": 2}})
    assert not loop_clips({**base, "bf16": {"enabled": True}})
