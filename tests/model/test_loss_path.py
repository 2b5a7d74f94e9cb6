"""The masked-only, chunked loss path against the full-logits path of the same network."""

import pytest
import torch

import model.projection as projection
from model import Diffusion, compile_backbone
from model.objectives import NEG_INFINITY, subs_parameterization
from tests.conftest import randomize_, tiny_config

CASES = {
    "subs": dict(),
    "subs-discrete": dict(T=10),
    "d3pm": dict(parameterization="d3pm", T=10),
    "d3pm-subs-masking": dict(parameterization="d3pm", T=10, subs_masking=True),
    "sedd": dict(parameterization="sedd", time_conditioning=True),
    "subs-importance": dict(time_conditioning=True, importance_sampling=True),
    "subs-change-of-variables": dict(change_of_variables=True),
    "ar": dict(backbone="ar", parameterization="ar"),
}
VOCAB = dict(vocab_size=101, mask_index=100, length=16)


def run(path: str, changes: dict, chunk_rows: int = 7, dropout: float = 0.0, **extra):
    """Loss, per-token losses and gradients of one fixed batch (padding in row 1)."""
    torch.manual_seed(0)
    model = Diffusion(tiny_config(loss_path=path, loss_chunk_rows=chunk_rows, dropout=dropout,
                                  **VOCAB, **changes, **extra))
    randomize_(model, std=0.1)
    x0 = torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x0)
    mask[1, 9:] = 0
    torch.manual_seed(1)  # dropout
    out = model.loss(x0, mask, generator=torch.Generator().manual_seed(5))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", list(CASES))
def test_masked_path_equals_full_path(name):
    full, full_grads = run("full", CASES[name])
    masked, masked_grads = run("masked", CASES[name])
    torch.testing.assert_close(masked.nlls, full.nlls.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(masked.loss, full.loss, rtol=1e-6, atol=0)
    assert torch.equal(masked.token_mask, full.token_mask)
    assert masked_grads.keys() == full_grads.keys()
    for key, grad in full_grads.items():
        err = (masked_grads[key] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert err < 1e-5, (key, float(err))
    assert bool((full.nlls != 0).any())  # the batch really has masked positions


@pytest.mark.parametrize("name", ["subs", "sedd", "ar"])
def test_chunking_does_not_change_the_result(name):
    one, one_grads = run("masked", CASES[name], chunk_rows=1)
    all_rows, all_grads = run("masked", CASES[name], chunk_rows=10_000)
    torch.testing.assert_close(one.nlls, all_rows.nlls, rtol=1e-6, atol=1e-6)
    for key, grad in all_grads.items():
        torch.testing.assert_close(one_grads[key], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["subs", "ar", "sedd"])
def test_padding_the_vocabulary_does_not_change_the_result(name, monkeypatch):
    """The CUDA path pads the weight's rows to an aligned count (101 -> 128 here): padded
    logits get no probability and the gradients keep the weight's shape."""
    plain, plain_grads = run("masked", CASES[name])
    monkeypatch.setitem(projection.PAD_VOCAB_TO, "cpu", 64)
    padded, padded_grads = run("masked", CASES[name])
    torch.testing.assert_close(padded.nlls, plain.nlls, rtol=1e-6, atol=1e-6)
    for key, grad in plain_grads.items():
        assert padded_grads[key].shape == grad.shape, key
        torch.testing.assert_close(padded_grads[key], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fill", [None, (100, NEG_INFINITY)])
def test_the_compiled_cross_entropy_equals_the_in_place_one(fill):
    """Losses and gradient of one chunk: padded to 128 columns, [MASK] filled or not; the
    compiled kernel also in bf16, as it runs under autocast."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 128, generator=g) * 3
    targets = torch.randint(0, 100, (37,), generator=g)
    weights = torch.rand(37, generator=g)
    reference = logits.clone()
    if fill is not None:
        reference[:, fill[0]] = fill[1]
    reference[:, 101:] = -torch.inf
    losses, grad = projection._cross_entropy_in_place(reference, targets, weights)
    args = (targets, weights, 101, -1 if fill is None else fill[0],
            0.0 if fill is None else fill[1])
    for function in (projection.cross_entropy_and_gradient, projection._fused_cross_entropy):
        got_losses, got_grad = function(logits, *args)
        torch.testing.assert_close(got_losses, losses, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_grad, grad, rtol=1e-5, atol=1e-8)
    low = logits.bfloat16()
    _, eager = projection.cross_entropy_and_gradient(low, *args)
    _, compiled = projection._fused_cross_entropy(low, *args)
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("name", ["subs", "ar", "d3pm-subs-masking"])
def test_the_fused_cross_entropy_does_not_change_the_result(name, monkeypatch):
    """A compiled model's projection scores its cross entropy with the fused function
    (eager here: the kernel itself is compared above), padding included."""
    plain, plain_grads = run("masked", CASES[name])
    monkeypatch.setitem(projection.PAD_VOCAB_TO, "cpu", 64)
    monkeypatch.setattr(projection, "_fused_cross_entropy",
                        projection.cross_entropy_and_gradient)
    monkeypatch.setattr(projection.Projection, "fused_loss", True)
    fused, fused_grads = run("masked", CASES[name])
    torch.testing.assert_close(fused.nlls, plain.nlls, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for key, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[key], grad, rtol=1e-5, atol=1e-7)


def test_compiling_the_backbone_fuses_its_cross_entropy():
    model = Diffusion(tiny_config(**VOCAB))
    assert not model.backbone.output_layer.linear.fused_loss
    compile_backbone(model.backbone)
    assert model.backbone.output_layer.linear.fused_loss


@pytest.mark.parametrize("name", ["subs", "ar"])
def test_no_more_than_one_chunk_of_logits_exists(name, monkeypatch):
    rows_seen = []
    original = projection.F.linear

    def spy(h, weight, *args):
        if weight.shape[0] == VOCAB["vocab_size"]:  # the projection onto the vocabulary
            rows_seen.append(h.shape[0])
        return original(h, weight, *args)

    monkeypatch.setattr(projection.F, "linear", spy)
    out, _ = run("masked", CASES[name], chunk_rows=4)
    assert rows_seen and max(rows_seen) <= 4
    counted = int((out.nlls != 0).sum())
    assert sum(rows_seen) >= counted  # every scored position went through a chunk
    if name == "subs":  # only masked real positions are projected
        assert sum(rows_seen) < out.token_mask.numel()


@pytest.mark.parametrize("name", ["subs", "sedd", "d3pm", "ar"])
def test_evaluation_without_gradients_gives_the_same_losses(name):
    torch.manual_seed(0)
    model = Diffusion(tiny_config(loss_chunk_rows=5, **VOCAB, **CASES[name]))
    randomize_(model, std=0.1)
    x0 = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    with_grad = model.loss(x0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        without = model.loss(x0, generator=torch.Generator().manual_seed(2))
    assert without.loss.grad_fn is None
    # the same losses; training's in-place cross entropy rounds differently in the last bits
    torch.testing.assert_close(without.nlls, with_grad.nlls, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(without.loss, with_grad.loss.detach(), rtol=1e-7, atol=0)


def test_gradients_accumulate_over_micro_batches():
    torch.manual_seed(0)
    x0 = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    grads = {}
    for path in ("full", "masked"):
        model = Diffusion(tiny_config(loss_path=path, loss_chunk_rows=3, **VOCAB))
        randomize_(model, std=0.1)
        for half in (slice(0, 2), slice(2, 4)):
            model.loss(x0[half], t=t[half],
                       generator=torch.Generator().manual_seed(9)).loss.backward()
        grads[path] = {n: p.grad for n, p in model.named_parameters()}
    for key, grad in grads["full"].items():
        torch.testing.assert_close(grads["masked"][key], grad, rtol=1e-5, atol=1e-7)


def test_gradient_scales_with_the_loss():
    torch.manual_seed(0)
    model = Diffusion(tiny_config(**VOCAB))
    randomize_(model, std=0.1)
    x0 = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    (3.0 * model.loss(x0, generator=torch.Generator().manual_seed(1)).loss).backward()
    tripled = model.backbone.output_layer.linear.weight.grad.clone()
    model.zero_grad()
    model.loss(x0, generator=torch.Generator().manual_seed(1)).loss.backward()
    torch.testing.assert_close(tripled, 3 * model.backbone.output_layer.linear.weight.grad)


@pytest.mark.parametrize("name", ["subs", "ar"])
def test_masked_path_under_bf16_autocast_stays_close(name):
    full, _ = run("full", CASES[name], autocast="bf16")
    masked, _ = run("masked", CASES[name], autocast="bf16")
    torch.testing.assert_close(masked.loss, full.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["subs", "ar"])
def test_activation_checkpointing_gives_identical_losses_and_gradients(name):
    plain, plain_grads = run("masked", CASES[name], dropout=0.1)
    ckpt, ckpt_grads = run("masked", CASES[name], dropout=0.1, activation_checkpointing=True)
    assert torch.equal(plain.nlls, ckpt.nlls)  # same dropout masks in the recomputation
    for key, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[key], grad, rtol=1e-6, atol=1e-8)


def test_subs_parameterization_matches_boolean_indexing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 11, generator=g)
    xt = torch.randint(0, 11, (3, 8), generator=g)
    xt[:, ::2] = 10
    reference = logits.clone()
    reference[:, :, 10] += NEG_INFINITY
    reference = reference - torch.logsumexp(reference, dim=-1, keepdim=True)
    unmasked = xt != 10
    reference[unmasked] = NEG_INFINITY
    reference[unmasked, xt[unmasked]] = 0
    assert torch.equal(subs_parameterization(logits.clone(), xt, 10), reference)


def test_text8_crop_offset_is_drawn_on_the_generators_device(monkeypatch):
    import model.diffusion as diffusion

    original = torch.randint
    seen = []

    def randint(*args, generator=None, device=None, **kwargs):
        # as torch does for a CUDA generator and a CPU tensor: the devices must agree
        seen.append(device)
        if generator is not None and torch.device(device or "cpu") != generator.device:
            raise RuntimeError("generator and tensor devices differ")
        return original(*args, generator=generator, device=device, **kwargs)

    model = Diffusion(tiny_config(backbone="ar", parameterization="ar", bos_index=1,
                                  eos_index=2))
    x0 = torch.randint(3, 22, (2, 24))
    monkeypatch.setattr(diffusion.torch, "randint", randint)
    model._crop(x0, torch.ones_like(x0), torch.Generator())
    assert seen == [torch.device("cpu")]
