"""Block diffusion (parameterization=bd3lm): its attention mask, and its loss against MDLM
(one block) and against the autoregressive likelihood of the same network (blocks of 1)."""

import math

import pytest
import torch

from model import Diffusion, block_diffusion
from model import objectives as obj
from model.errors import CheckpointError, ConfigError
from tests.conftest import randomize_, tiny_config

BD3 = dict(parameterization="bd3lm", resample=False)


def brute_force_mask(length: int, block_size: int) -> torch.Tensor:
    """The mask written out from its definition, one (query, key) pair at a time."""
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_clean, k_clean = q >= length, k >= length
            q_block, k_block = (q % length) // block_size, (k % length) // block_size
            if not q_clean and not k_clean:  # x_t: its own block only
                mask[q, k] = q_block == k_block
            elif not q_clean and k_clean:  # x_t reads the clean blocks before its own
                mask[q, k] = k_block < q_block
            elif q_clean and k_clean:  # x_0: block-causal
                mask[q, k] = k_block <= q_block
    return mask


@pytest.mark.parametrize("length,block_size", [(1, 1), (4, 1), (4, 2), (4, 4), (6, 3),
                                               (8, 2), (8, 8)])
def test_attention_mask_equals_its_definition(length, block_size):
    assert torch.equal(block_diffusion.attention_mask(length, block_size),
                       brute_force_mask(length, block_size))


@pytest.mark.parametrize("length,block_size", [(4, 1), (6, 3), (8, 2), (12, 4), (200, 16)])
def test_the_flex_block_mask_equals_the_definition(length, block_size):
    """Element by element (its mask function) and tile by tile: the BlockMask keeps every
    tile holding an allowed pair and skips the rest."""
    from torch.nn.attention.flex_attention import create_mask

    flex = block_diffusion.flex_mask(length, block_size)
    dense = create_mask(flex.mask_mod, 1, 1, 2 * length, 2 * length, device="cpu")[0, 0]
    expected = brute_force_mask(length, block_size)
    assert torch.equal(dense, expected)
    tile = flex.BLOCK_SIZE[0]
    tiles = -(-2 * length // tile)
    padded = torch.zeros(tiles * tile, tiles * tile, dtype=torch.bool)
    padded[:2 * length, :2 * length] = expected
    needed = padded.view(tiles, tile, tiles, tile).any(3).any(1)
    assert torch.equal(flex.to_dense()[0, 0].bool(), needed)


def test_flex_attention_gives_the_sdpa_losses(monkeypatch):
    """Flex attention with the BlockMask against SDPA with the dense mask: the same weights,
    noise and times give the same losses. Flex runs on CUDA only in training (it has no
    backward on the CPU), so here it is forced on, without gradients; the GPU check
    (``benchmarks/gpu_checks.py bd3lm-flex``) compares gradients too."""
    import warnings

    import model.dit

    network = randomize_(Diffusion(tiny_config(block_size=4, **BD3)))
    x0 = torch.randint(0, 22, (3, 12), generator=torch.Generator().manual_seed(2))
    losses = {}
    for flex in (False, True):
        monkeypatch.setattr(model.dit, "uses_flex", lambda requested, device, on=flex: on)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
            losses[flex] = network.loss(x0, generator=torch.Generator().manual_seed(3)).nlls
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert not model.attention.uses_flex("flex", torch.device("cpu"))


def test_one_block_leaves_the_noisy_half_as_mdlm_sees_it():
    """With block_size = length, x_t attends to nothing of x_0: its logits are the DiT's
    on x_t alone."""
    model = randomize_(Diffusion(tiny_config(**BD3)))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 22, (3, 12), generator=g)
    xt = torch.where(torch.rand(3, 12, generator=g) < 0.5, 22, x0)
    torch.testing.assert_close(model.backbone(xt, None, clean=x0), model.backbone(xt, None),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_path", ["masked", "full"])
def test_one_block_gives_the_mdlm_loss_of_the_same_weights(loss_path, monkeypatch):
    """Same weights, same t and same masked positions: the bd3lm loss with one block equals
    MDLM's (whose weight sigma'/(e^sigma - 1) is 1/t under the log-linear schedule)."""
    mdlm = randomize_(Diffusion(tiny_config(loss_path=loss_path)))
    bd3 = Diffusion(tiny_config(loss_path=loss_path, **BD3))
    bd3.load_state_dict(mdlm.state_dict())
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 22, (4, 12), generator=g)
    xt = torch.where(torch.rand(4, 12, generator=g) < 0.6, 22, x0)
    mask = torch.ones_like(x0)
    mask[2, 8:] = 0
    t = torch.tensor([0.3, 0.6, 0.9, 0.5])
    monkeypatch.setattr(obj, "q_xt", lambda *args, **kwargs: xt.clone())
    monkeypatch.setattr(block_diffusion, "q_xt", lambda *args, **kwargs: xt.clone())
    ours, theirs = bd3.loss(x0, mask, t=t), mdlm.loss(x0, mask, t=t)
    torch.testing.assert_close(ours.nlls, theirs.nlls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)


def test_masked_path_equals_full_path():
    losses, grads = {}, {}
    for path in ("masked", "full"):
        model = randomize_(Diffusion(tiny_config(loss_path=path, block_size=4, **BD3)))
        x0 = torch.randint(0, 22, (3, 12), generator=torch.Generator().manual_seed(2))
        out = model.loss(x0, generator=torch.Generator().manual_seed(3))
        out.loss.backward()
        losses[path] = out.nlls
        grads[path] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses["masked"], losses["full"], rtol=1e-6, atol=1e-6)
    for name, grad in grads["full"].items():
        torch.testing.assert_close(grads["masked"][name], grad, rtol=1e-5, atol=1e-7)


def test_blocks_of_one_token_estimate_the_autoregressive_likelihood():
    """Block size 1: token i is masked with probability t and then weighs 1/t, and it sees
    only the clean tokens before it. So the expected loss is the network's exact
    autoregressive NLL, the loss with every token masked (t = 1): a Monte Carlo test at
    fixed seeds, within four standard errors."""
    model = randomize_(Diffusion(tiny_config(block_size=1, **BD3)), std=0.3).eval()
    x0 = torch.randint(0, 22, (2, 12), generator=torch.Generator().manual_seed(4))
    exact_model = Diffusion(tiny_config(block_size=1, sampling_eps_min=1.0,
                                        sampling_eps_max=1.0, **BD3)).eval()
    exact_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        exact = exact_model.loss(x0).nlls.sum(-1)
        g = torch.Generator().manual_seed(5)  # 2000 draws for each sequence, in one batch
        draws = model.loss(x0.repeat(2000, 1), generator=g).nlls.sum(-1).view(2000, 2)
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - exact).abs() < 4 * stderr).all(), (mean, exact, stderr)
    assert (stderr < 0.05 * exact).all()  # the test has the power to see a wrong weight


def test_clipped_masking_keeps_every_block_inside_its_bounds():
    g = torch.Generator().manual_seed(6)
    x0 = torch.randint(0, 22, (64, 16), generator=g)
    t = block_diffusion.sample_block_t(64, 4, "cpu", 0.3, 0.8, generator=g)
    assert ((t >= 0.3) & (t <= 0.8)).all()
    xt = block_diffusion.q_xt(x0, t, 4, 22, 0.3, 0.8, resample=True, generator=g)
    share = (xt == 22).float().view(64, 4, 4).mean(-1)
    assert ((share >= 0.3) & (share <= 0.8)).all()


def test_antithetic_times_cover_every_stratum_once():
    t = block_diffusion.sample_block_t(4, 8, "cpu", 0.0 + 1e-9, 1.0,
                                       generator=torch.Generator().manual_seed(7))
    strata = torch.sort((t.flatten() * 32).floor()).values
    assert torch.equal(strata, torch.arange(32, dtype=strata.dtype))


@pytest.mark.parametrize("changes,words", [
    (dict(block_size=5), "model.block_size=5 must divide model.length=12"),
    (dict(sampling_eps_min=0.6, sampling_eps_max=0.4), "must satisfy 0 < min <= max <= 1"),
    (dict(time_conditioning=True), "without time conditioning"),
])
def test_bad_block_diffusion_settings_are_one_sentence(changes, words):
    with pytest.raises(ConfigError, match=words):
        tiny_config(**{**BD3, **changes})


def test_the_sampling_pass_gives_the_training_logits():
    """A noisy block after a clean prefix, through the cache, has the logits the training
    pass gives that block of x_t beside x_0: sampling and training see the same thing."""
    model = randomize_(Diffusion(tiny_config(block_size=4, **BD3)))
    g = torch.Generator().manual_seed(8)
    x0 = torch.randint(0, 22, (2, 12), generator=g)
    xt = torch.where(torch.rand(2, 12, generator=g) < 0.5, 22, x0)
    trained = model.backbone(xt, None, clean=x0)
    cache = None
    for start in range(0, 12, 4):
        logits, _ = model.backbone.extend(xt[:, start:start + 4], cache)
        torch.testing.assert_close(logits, trained[:, start:start + 4], rtol=1e-5, atol=1e-5)
        _, cache = model.backbone.extend(x0[:, start:start + 4], cache, logits=False)


@pytest.mark.parametrize("predictor", ["ddpm_cache", "first_hitting"])
def test_cached_sampling_equals_recomputing_the_prefix(predictor):
    from sampling.blocks import block_sample

    model = randomize_(Diffusion(tiny_config(block_size=4, length=16, **BD3)), std=0.3).eval()
    runs = [block_sample(model, 3, 16, 8, predictor=predictor, kv_cache=cache,
                         generator=torch.Generator().manual_seed(9)) for cache in (True, False)]
    (cached, _, cached_calls), (recomputed, _, recomputed_calls) = runs
    assert torch.equal(cached, recomputed)
    assert (cached != 22).all()
    assert cached_calls == recomputed_calls


def test_sampling_goes_past_the_training_length_and_stops_at_eos():
    from sampling.blocks import block_sample

    model = randomize_(Diffusion(tiny_config(block_size=4, length=8, bos_index=0,
                                             eos_index=0, **BD3)), std=0.3).eval()
    tokens, lengths, _ = block_sample(model, 2, 24, 4, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (2, 24) and (lengths == 24).all() and (tokens[:, 0] == 0).all()
    with torch.no_grad():
        model.backbone.output_layer.linear.bias[0] = 50.0  # every token predicted is EOS
    tokens, lengths, _ = block_sample(model, 2, 24, 4, stop_at_eos=True,
                                      generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (2, 4)  # all rows stopped after the first block
    assert lengths.tolist() == [2, 2]  # BOS, then the EOS that ends the text


def reference_bd3lm_logits(state: dict, x_t, x_0, block_size: int, n_heads: int):
    """The BD3-LM release's DiT forward on x_t beside x_0, written out from its weights
    alone (no project code): embeddings, rotary at positions 0..L-1 for both halves, the
    block-diffusion mask, adaLN blocks without time conditioning, the x_t half's logits."""
    import torch.nn.functional as F

    def w(name):
        return state["backbone." + name]

    length = x_t.shape[1]
    x = w("vocab_embed.embedding")[torch.cat([x_t, x_0], 1)]
    t_freq = torch.zeros(x.shape[0], 256)  # sigma = 0: cos(0) = 1, sin(0) = 0
    t_freq[:, :128] = 1.0
    c = F.linear(t_freq, w("sigma_map.mlp.0.weight"), w("sigma_map.mlp.0.bias"))
    c = F.silu(F.linear(F.silu(c), w("sigma_map.mlp.2.weight"), w("sigma_map.mlp.2.bias")))
    head = x.shape[-1] // n_heads
    inv = 1.0 / (10000 ** (torch.arange(0, head, 2).float() / head))
    angles = torch.outer(torch.arange(length).float(), inv).repeat(2, 1)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos[None, :, None] + torch.cat([-t[..., half:], t[..., :half]], -1) \
            * sin[None, :, None]

    mask = brute_force_mask(length, block_size)
    n_layers = len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")})
    for i in range(n_layers):
        def b(name, i=i):
            return w(f"blocks.{i}.{name}")
        mods = F.linear(c, b("adaLN_modulation.weight"), b("adaLN_modulation.bias"))
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:, None].chunk(6, -1)
        h = F.layer_norm(x, (x.shape[-1],), b("norm1.weight")) * (1 + scale1) + shift1
        q, k, v = (h @ b("attn_qkv.weight").T).view(*h.shape[:2], 3, n_heads, head).unbind(2)
        q, k = rope(q), rope(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / head ** 0.5
        attn = scores.masked_fill(~mask, -torch.inf).softmax(-1)
        h = torch.einsum("bhqk,bkhd->bqhd", attn, v).reshape(h.shape)
        x = x + gate1 * (h @ b("attn_out.weight").T)
        h = F.layer_norm(x, (x.shape[-1],), b("norm2.weight")) * (1 + scale2) + shift2
        h = F.linear(F.gelu(F.linear(h, b("mlp.0.weight"), b("mlp.0.bias")), approximate="tanh"),
                     b("mlp.2.weight"), b("mlp.2.bias"))
        x = x + gate2 * h
    shift, scale = F.linear(c, w("output_layer.adaLN_modulation.weight"),
                            w("output_layer.adaLN_modulation.bias"))[:, None].chunk(2, -1)
    h = F.layer_norm(x[:, :length], (x.shape[-1],), w("output_layer.norm_final.weight"))
    return F.linear(h * (1 + scale) + shift, w("output_layer.linear.weight"),
                    w("output_layer.linear.bias"))


def test_a_release_bd3lm_checkpoint_loads_and_gives_the_reference_logits(tmp_path):
    """config.json and weights as kuleshov-group/bd3lm-owt-block_size4 holds them (its
    learned clip bounds as top-level tensors), written here: strict keys, the release's
    settings, and logits equal to the reference forward above."""
    import json

    from safetensors.torch import save_file

    from model import load_pretrained

    source = randomize_(Diffusion(tiny_config(block_size=4, **BD3)), std=0.2)
    state = {"backbone." + k: v.clone().contiguous()
             for k, v in source.backbone.state_dict().items()}
    state.update(sampling_eps_min=torch.tensor(0.45), sampling_eps_max=torch.tensor(0.95))
    directory = tmp_path / "bd3lm-owt-block_size4"
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "bd3lm", "architectures": ["BD3LM"], "block_size": 4,
        "vocab_size": 23, "model_length": 12, "cross_attn": True, "adaln": True,
        "attn_backend": "flex", "causal": False, "hidden_dim": 32, "cond_dim": 16,
        "n_blocks": 2, "n_heads": 2, "dropout": 0.1, "time_conditioning": False,
        "var_min": True, "sampling_eps_min": 1e-3, "sampling_eps_max": 0.999,
        "return_dict": False}))
    loaded = load_pretrained(directory)
    c = loaded.config
    assert (c.parameterization, c.block_size, c.ignore_bos, c.mask_index) == ("bd3lm", 4, True,
                                                                                22)
    assert (c.sampling_eps_min, c.sampling_eps_max) == pytest.approx((0.45, 0.95))
    g = torch.Generator().manual_seed(10)
    x0 = torch.randint(0, 22, (2, 12), generator=g)
    xt = torch.where(torch.rand(2, 12, generator=g) < 0.5, 22, x0)
    with torch.no_grad():
        ours = loaded.backbone(xt, None, clean=x0)
        reference = reference_bd3lm_logits(state, xt, x0, 4, n_heads=2)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)

    del state["backbone.blocks.1.attn_out.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: blocks.1.attn_out.weight"):
        load_pretrained(directory)


def test_a_block_diffusion_checkpoint_read_as_another_objective_is_one_sentence(tmp_path):
    """Blocks shorter than the context: read as subs (the run's default), the weights would
    score another model; blocks of the whole context are MDLM and read as it freely."""
    from model import load_pretrained, save_pretrained

    short = save_pretrained(Diffusion(tiny_config(block_size=4, **BD3)), tmp_path / "b4")
    with pytest.raises(CheckpointError, match="block_size=4 but is read as "
                                              "parameterization=subs; add parameterization"):
        load_pretrained(short, parameterization="subs")
    assert load_pretrained(short, parameterization="bd3lm").config.block_size == 4
    assert load_pretrained(short).config.parameterization == "bd3lm"
    whole = save_pretrained(Diffusion(tiny_config(**BD3)), tmp_path / "whole")
    assert load_pretrained(whole, parameterization="subs").config.parameterization == "subs"


def test_exporting_a_block_diffusion_checkpoint_is_one_sentence(tmp_path, capsys):
    from model import save_pretrained
    from pretrain.export import main

    directory = save_pretrained(Diffusion(tiny_config(block_size=4, **BD3)), tmp_path / "m")
    assert main([str(directory), str(tmp_path / "out")]) == 2
    assert "has no block diffusion" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
