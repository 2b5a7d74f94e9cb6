import pytest
import torch

from model import ConfigError, Diffusion, ModelConfig
from model.attention import resolve_backend
from model.causal import CausalTransformer
from model.dit import DIT
from model.layers import apply_rotary
from model.objectives import NEG_INFINITY
from tests.conftest import randomize_, tiny_config

# The released networks' state-dict keys in order (one block), which checkpoints rely on.
DIT_KEYS = [
    "vocab_embed.embedding",
    "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias",
    "sigma_map.mlp.2.weight", "sigma_map.mlp.2.bias",
    "rotary_emb.inv_freq",
    "blocks.0.norm1.weight", "blocks.0.attn_qkv.weight", "blocks.0.attn_out.weight",
    "blocks.0.norm2.weight", "blocks.0.mlp.0.weight", "blocks.0.mlp.0.bias",
    "blocks.0.mlp.2.weight", "blocks.0.mlp.2.bias",
    "blocks.0.adaLN_modulation.weight", "blocks.0.adaLN_modulation.bias",
    "output_layer.norm_final.weight", "output_layer.linear.weight",
    "output_layer.linear.bias", "output_layer.adaLN_modulation.weight",
    "output_layer.adaLN_modulation.bias",
]
AR_KEYS = [
    "vocab_embed.embedding", "rotary_emb.inv_freq",
    "blocks.0.norm1.weight", "blocks.0.attn_qkv.weight", "blocks.0.attn_out.weight",
    "blocks.0.norm2.weight", "blocks.0.mlp.0.weight", "blocks.0.mlp.0.bias",
    "blocks.0.mlp.2.weight", "blocks.0.mlp.2.bias",
    "output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
]


def test_state_dict_keys_follow_the_release():
    dit = DIT(tiny_config(n_blocks=1))
    assert list(dit.state_dict()) == DIT_KEYS
    assert [n for n, _ in dit.named_parameters()] == [k for k in DIT_KEYS if "inv_freq" not in k]
    ar = CausalTransformer(tiny_config(n_blocks=1, backbone="ar", parameterization="ar"))
    assert list(ar.state_dict()) == AR_KEYS


def test_release_shapes_small():
    config = ModelConfig()  # small, GPT-2 vocabulary with the extra mask token
    dit = DIT(config)
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    assert shapes["vocab_embed.embedding"] == (50258, 768)
    assert shapes["sigma_map.mlp.0.weight"] == (128, 256)
    assert shapes["blocks.11.attn_qkv.weight"] == (2304, 768)
    assert shapes["blocks.0.adaLN_modulation.weight"] == (6 * 768, 128)
    assert shapes["output_layer.linear.weight"] == (50258, 768)
    assert shapes["rotary_emb.inv_freq"] == (32,)
    # 169.6M, by the formula of the architecture
    assert sum(p.numel() for p in dit.parameters()) == 169_627_218


def test_zero_initialised_layers():
    dit = DIT(tiny_config())
    for name, p in dit.named_parameters():
        if "adaLN_modulation" in name or "output_layer.linear" in name:
            assert torch.count_nonzero(p) == 0, name
    logits = dit(torch.zeros(2, 12, dtype=torch.long), None)
    assert logits.dtype == torch.float32 and torch.count_nonzero(logits) == 0


def reference_rotary(x, inv_freq):
    """Non-interleaved rotary as flash-attn's kernel computes it: halves (x1, x2) rotated by
    angles pos * inv_freq."""
    pos = torch.arange(x.shape[1], dtype=torch.float32)
    ang = torch.outer(pos, inv_freq)[None, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)


def test_rotary_matches_the_half_split_formula_and_leaves_v_alone():
    dit = DIT(tiny_config())
    qkv = torch.randn(2, 12, 3, 2, 16)
    cos, sin = dit.rotary_emb(12, qkv.device)
    out = apply_rotary(qkv, cos, sin)
    inv_freq = dit.rotary_emb.inv_freq
    torch.testing.assert_close(out[:, :, 0], reference_rotary(qkv[:, :, 0], inv_freq))
    torch.testing.assert_close(out[:, :, 1], reference_rotary(qkv[:, :, 1], inv_freq))
    assert torch.equal(out[:, :, 2], qkv[:, :, 2])
    # relative positions only: <R_m q, R_n k> depends on m - n
    q = torch.randn(16).expand(1, 12, 1, 16)
    k = torch.randn(16).expand(1, 12, 1, 16)
    rq = reference_rotary(q, inv_freq)[0, :, 0]
    rk = reference_rotary(k, inv_freq)[0, :, 0]
    torch.testing.assert_close(rq[5] @ rk[3], rq[9] @ rk[7])


def test_dit_attention_is_bidirectional_and_ar_is_causal(rng):
    x = torch.randint(0, 22, (1, 12), generator=rng)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 22
    dit = randomize_(DIT(tiny_config()).eval())
    assert not torch.allclose(dit(x, None)[0, 0], dit(y, None)[0, 0])
    ar = randomize_(CausalTransformer(tiny_config(backbone="ar", parameterization="ar")).eval())
    torch.testing.assert_close(ar(x)[0, :-1], ar(y)[0, :-1])
    assert not torch.allclose(ar(x)[0, -1], ar(y)[0, -1])


def test_ar_outputs_log_probabilities_without_mask(rng):
    ar = randomize_(CausalTransformer(tiny_config(backbone="ar", parameterization="ar")))
    logp = ar(torch.randint(0, 22, (3, 12), generator=rng))
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 12))
    assert torch.all(logp[..., 22].exp() == 0)


def test_subs_never_predicts_mask_and_carries_unmasked_tokens(rng):
    model = Diffusion(tiny_config())
    randomize_(model.backbone)
    xt = torch.randint(0, 22, (4, 12), generator=rng)
    xt[:, ::3] = 22
    logp = model(xt, None)
    p = logp.exp()
    assert torch.all(p[..., 22] == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 12))
    unmasked = xt != 22
    assert torch.all(logp[unmasked].gather(-1, xt[unmasked][:, None]) == 0)
    others = logp[unmasked].clone()
    others.scatter_(-1, xt[unmasked][:, None], NEG_INFINITY)
    assert torch.all(others == NEG_INFINITY)
    assert torch.all(p[unmasked].max(-1).values == 1)


def test_time_conditioning_switch(rng):
    x = torch.randint(0, 23, (2, 12), generator=rng)
    off = randomize_(DIT(tiny_config()))
    torch.testing.assert_close(off(x, torch.tensor([0.1, 0.2])), off(x, torch.tensor([3.0, 5.0])))
    on = randomize_(DIT(tiny_config(time_conditioning=True)))
    assert not torch.allclose(on(x, torch.tensor([0.1, 0.2])), on(x, torch.tensor([3.0, 5.0])))
    # sigma of shape (batch, 1) or a scalar is accepted
    torch.testing.assert_close(on(x, torch.tensor([[0.5], [0.5]])), on(x, torch.tensor(0.5)))


def test_dropout_only_in_training(rng):
    dit = randomize_(DIT(tiny_config(dropout=0.5)))
    x = torch.randint(0, 23, (2, 12), generator=rng)
    dit.train()
    assert not torch.allclose(dit(x, None), dit(x, None))
    dit.eval()
    torch.testing.assert_close(dit(x, None), dit(x, None))


def test_bf16_autocast_keeps_float32_logits_close(rng):
    x = torch.randint(0, 23, (2, 12), generator=rng)
    full = randomize_(DIT(tiny_config()), std=0.05)
    mixed = DIT(tiny_config(autocast="bf16"))
    mixed.load_state_dict(full.state_dict())
    a, b = full(x, None), mixed(x, None)
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
    assert not torch.equal(a, b)  # bf16 really ran


@pytest.mark.parametrize("changes", [
    dict(),
    dict(T=10),
    dict(parameterization="d3pm", T=10),
    dict(parameterization="d3pm", T=10, subs_masking=True),
    dict(parameterization="sedd", time_conditioning=True),
    dict(time_conditioning=True, importance_sampling=True),
    dict(change_of_variables=True),
    dict(backbone="ar", parameterization="ar"),
])
def test_gradients_reach_every_parameter(changes, rng):
    model = Diffusion(tiny_config(**changes))
    randomize_(model, std=0.1)
    x0 = torch.randint(0, 22, (8, 12), generator=rng)
    out = model.loss(x0, generator=rng)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_loss_averages_over_real_tokens(rng):
    model = Diffusion(tiny_config())
    randomize_(model.backbone)
    x0 = torch.randint(0, 22, (3, 12), generator=rng)
    mask = torch.ones_like(x0)
    mask[0, 6:] = 0
    out = model.loss(x0, mask, generator=torch.Generator().manual_seed(0))
    assert torch.all(out.nlls[0, 6:] == 0)
    torch.testing.assert_close(out.loss, out.nlls.sum() / 30)


def test_ar_loss_is_next_token_cross_entropy(rng):
    model = Diffusion(tiny_config(backbone="ar", parameterization="ar"))
    randomize_(model)
    x0 = torch.randint(0, 22, (2, 12), generator=rng)
    logp = model.backbone(x0[:, :-1])
    direct = -logp.gather(-1, x0[:, 1:, None]).squeeze(-1).mean()
    torch.testing.assert_close(model.loss(x0).loss, direct)


def test_text8_crop_blocks_are_cropped(rng):
    model = Diffusion(tiny_config(backbone="ar", parameterization="ar", bos_index=1, eos_index=2))
    x0 = torch.randint(3, 22, (2, 24), generator=rng)
    inputs, targets, mask = model._crop(x0, torch.ones_like(x0), rng)
    assert inputs.shape == targets.shape == mask.shape == (2, 12)
    assert torch.all(inputs[:, 0] == 1) and torch.all(targets[:, -1] == 2)
    with pytest.raises(ValueError, match="model.length=12"):
        model.loss(torch.zeros(2, 20, dtype=torch.long))


@pytest.mark.parametrize("changes, message", [
    (dict(parameterization="d3pm"), "set T>0"),
    (dict(parameterization="sedd", time_conditioning=True, importance_sampling=True),
     "importance_sampling"),
    (dict(parameterization="sedd"), "time_conditioning=True"),
    (dict(subs_masking=True), "subs_masking"),
    (dict(parameterization="sedd", time_conditioning=True, T=10), "T=10"),
    (dict(importance_sampling=True, change_of_variables=True), "cannot both"),
    (dict(parameterization="ar"), "backbone=ar"),
    (dict(backbone="ar"), "backbone=ar"),
    (dict(hidden_size=33), "divisible"),
    (dict(hidden_size=30), "even"),
    (dict(mask_index=23), "outside the vocabulary"),
    (dict(noise={"type": "cosine"}, importance_sampling=True), "loglinear"),
    (dict(noise={"type": "linear"}, T=10), "loglinear"),
    (dict(noise={"type": "nope"}), "noise.type"),
    (dict(attn_backend="xformers"), "attn_backend"),
])
def test_invalid_combinations_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**changes)


def test_replace_suggests_the_closest_field():
    with pytest.raises(ConfigError, match="time_conditioning"):
        tiny_config().replace(time_conditionning=True)


def test_attention_backend_resolution():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("sdpa", cpu) == "sdpa"
    with pytest.raises(ConfigError, match="flash-attn"):
        resolve_backend("flash", cpu)


@pytest.mark.slow
def test_compiled_blocks_match_eager(rng):
    x = torch.randint(0, 23, (2, 12), generator=rng)
    eager = randomize_(DIT(tiny_config()).eval(), std=0.05)
    compiled = Diffusion(tiny_config(compile=True)).backbone.eval()
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(compiled(x, None), eager(x, None), atol=1e-4, rtol=1e-4)


def test_mixed_precision_rounds_where_the_release_does(rng):
    """Under bf16 autocast the logits come from a bf16 projection (so they are exactly
    representable in bf16) and rotary is computed in float32 and rounded once."""
    x = torch.randint(0, 23, (2, 12), generator=rng)
    mixed = randomize_(DIT(tiny_config(autocast="bf16")), std=0.05)
    logits = mixed(x, None)
    assert logits.dtype == torch.float32
    assert torch.equal(logits.to(torch.bfloat16).float(), logits)
    qkv = torch.randn(2, 12, 3, 2, 16).to(torch.bfloat16)
    cos, sin = mixed.rotary_emb(12, qkv.device)
    out = apply_rotary(qkv, cos, sin)
    inv_freq = mixed.rotary_emb.inv_freq
    pos = torch.arange(12, dtype=torch.float32)
    ang = torch.cat([torch.outer(pos, inv_freq)] * 2, -1)
    c, s = ang.cos().to(torch.bfloat16).float(), ang.sin().to(torch.bfloat16).float()
    q = qkv[:, :, 0].float()
    x1, x2 = q.chunk(2, -1)
    expected = q * c[None, :, None] + torch.cat([-x2, x1], -1) * s[None, :, None]
    assert torch.equal(out[:, :, 0], expected.to(torch.bfloat16))


def test_time_conditioned_model_needs_sigma(rng):
    dit = DIT(tiny_config(time_conditioning=True))
    with pytest.raises(ValueError, match="pass sigma"):
        dit(torch.zeros(1, 12, dtype=torch.long), None)


def test_tokenizer_ids_follow_the_release_rule():
    from types import SimpleNamespace

    from model import tokenizer_ids

    gpt2 = SimpleNamespace(vocab_size=50257, mask_token=None, bos_token_id=50256,
                           eos_token_id=50256)
    assert tokenizer_ids(gpt2) == dict(vocab_size=50258, mask_index=50257, bos_index=50256,
                                       eos_index=50256)
    bert = SimpleNamespace(vocab_size=30522, mask_token="[MASK]", mask_token_id=103,
                           bos_token_id=None, eos_token_id=None, cls_token_id=101,
                           sep_token_id=102)
    assert tokenizer_ids(bert) == dict(vocab_size=30522, mask_index=103, bos_index=101,
                                       eos_index=102)


def test_unsupported_backbone_is_named():
    from omegaconf import OmegaConf

    from model import from_run_config

    cfg = OmegaConf.create(dict(backbone="dimamba", parameterization="subs", T=0,
                                time_conditioning=False, subs_masking=False,
                                model=dict(length=12, hidden_size=32, cond_dim=16,
                                           n_blocks=1, n_heads=2, dropout=0.0)))
    with pytest.raises(ConfigError, match="backbone=dimamba is not supported"):
        from_run_config(cfg, vocab_size=23, mask_index=22)
    cfg.backbone = "hf_dit"
    assert from_run_config(cfg, vocab_size=23, mask_index=22).backbone == "dit"


def test_bf16_weights_keep_float32_rotary_and_run_the_time_embedding():
    """DeepSpeed's bf16 engine casts the whole module: the rotary angles must still come
    from float32 frequencies, and the time embedding must meet its bf16 weights."""
    model = Diffusion(tiny_config(length=512, time_conditioning=True, autocast="bf16"))
    cos, sin = model.backbone.rotary_emb(512, torch.device("cpu"))
    model.bfloat16()
    assert model.backbone.rotary_emb.inv_freq.dtype == torch.bfloat16
    model.backbone.rotary_emb._cache = None
    cos_b, sin_b = model.backbone.rotary_emb(512, torch.device("cpu"))
    assert torch.equal(cos, cos_b) and torch.equal(sin, sin_b)
    x = torch.randint(0, 22, (2, 512))
    out = model.backbone(x, torch.full((2,), 0.5))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
