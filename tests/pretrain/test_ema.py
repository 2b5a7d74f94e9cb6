import torch

from pretrain.ema import EMA, _groups


def reference(shadow, params, decays):
    for decay in decays:
        shadow = [s + (1 - decay) * (p.float() - s) for s, p in zip(shadow, params)]
    return shadow


def test_groups_cover_every_parameter_once():
    assert _groups([5, 5, 5], float32=True) == [(0, 3)]
    assert _groups([4, 4, 4, 1], float32=False, budget=8) == [(0, 2), (2, 4)]
    assert _groups([20, 3], float32=False, budget=8) == [(0, 1), (1, 2)]


def test_update_follows_the_decay_warm_up_for_float32_and_bf16_weights():
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in (7, 3, 9)]
        ema = EMA([(f"p{i}", p) for i, p in enumerate(params)], decay=0.9)
        if dtype != torch.float32:
            assert len(ema._groups) == 1  # all small enough for one group
            ema._groups = _groups([7, 3, 9], float32=False, budget=8)
        start = [p.detach().float().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.mul_(2)
        for _ in range(3):
            ema.update()
        decays = [min(0.9, (1 + n) / (10 + n)) for n in (1, 2, 3)]
        for got, want in zip(ema.shadow, reference(start, params, decays)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
