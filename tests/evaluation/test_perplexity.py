import math

import pytest
import torch

from evaluation import perplexity, shard_batches
from model import Diffusion
from tests.conftest import randomize_, tiny_config

V, L = 23, 12


class IIDDenoiser(torch.nn.Module):
    """p(x0 | xt) = pi at every position: the exact posterior of i.i.d. tokens from pi."""

    def __init__(self, log_pi):
        super().__init__()
        self.log_pi = torch.nn.Parameter(log_pi, requires_grad=False)

    def forward(self, indices, sigma=None):
        return self.log_pi.expand(*indices.shape, -1).clone()


class Rows(torch.utils.data.Dataset):
    def __init__(self, ids, mask=None):
        self.ids = ids
        self.mask = torch.ones_like(ids) if mask is None else mask

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


@pytest.fixture
def iid_setup():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g)
    logits[V - 1] = -1e4
    log_pi = logits.log_softmax(-1)
    data = torch.multinomial(log_pi.exp(), 512 * L, replacement=True, generator=g).view(512, L)
    model = Diffusion(tiny_config())
    model.backbone = IIDDenoiser(log_pi)
    eps = model.noise.eps
    analytic = float((1 - eps) * -log_pi[data].mean())  # E_t[(1 - eps) t / t] per token
    return model, Rows(data), analytic


def test_mdlm_bound_matches_the_analytic_value_with_an_honest_stderr(iid_setup):
    model, data, analytic = iid_setup
    result = perplexity(model, shard_batches(data, 16), num_mc_samples=16, seed=3)
    assert abs(result["nll"] - analytic) < 3 * result["stderr"]
    assert result["stderr"] < 0.02 * analytic  # the check has teeth
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))
    assert result["bpd"] == pytest.approx(result["nll"] / math.log(2))
    assert (result["tokens"], result["sequences"]) == (512 * L, 512)
    # the reported stderr matches the spread of the estimate over seeds
    runs = [perplexity(model, shard_batches(data, 16), num_mc_samples=4, seed=s)
            for s in range(12)]
    spread = torch.tensor([r["nll"] for r in runs]).std().item()
    reported = sum(r["stderr"] for r in runs) / len(runs)
    assert 0.5 < spread / reported < 2.0, (spread, reported)


def test_single_pass_stderr_bounds_the_monte_carlo_error(iid_setup):
    model, data, analytic = iid_setup
    one = perplexity(model, shard_batches(data, 8), num_mc_samples=1, seed=0)
    runs = [perplexity(model, shard_batches(data, 8), seed=s)["nll"] for s in range(12)]
    assert one["stderr"] > 0.5 * torch.tensor(runs).std().item()
    assert abs(one["nll"] - analytic) < 4 * one["stderr"]


def test_ar_equals_direct_next_token_nll(rng):
    model = randomize_(Diffusion(tiny_config(backbone="ar", parameterization="ar")), std=0.1)
    ids = torch.randint(0, V - 1, (10, L), generator=rng)
    mask = torch.ones_like(ids)
    mask[3, 7:] = 0
    result = perplexity(model.eval(), shard_batches(Rows(ids, mask), 4), num_mc_samples=5)
    with torch.no_grad():
        logp = model.backbone(ids[:, :-1])
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    weights = mask[:, 1:].double()
    direct = float((nll.double() * weights).sum() / weights.sum())
    assert result["nll"] == pytest.approx(direct, rel=1e-12)
    assert result["stderr"] == 0 and result["num_mc_samples"] == 1
    assert result["tokens"] == int(weights.sum())


def two_ranks(model, data, batch_size, **kw):
    """Rank 1 then rank 0 of a 2-rank evaluation, in-process: the reduction adds the other
    rank's local sums."""
    local = []
    perplexity(model, shard_batches(data, batch_size, 1, 2),
               reduce=lambda t: local.append(t.clone()) or t, **kw)
    calls = iter(local)
    return perplexity(model, shard_batches(data, batch_size, 0, 2),
                      reduce=lambda t: t + next(calls), **kw)


@pytest.mark.parametrize("changes", [dict(), dict(backbone="ar", parameterization="ar"),
                                     dict(T=10)])
def test_two_ranks_equal_one(changes, rng):
    model = randomize_(Diffusion(tiny_config(**changes)), std=0.1).eval()
    data = Rows(torch.randint(0, V - 1, (21, L), generator=rng))
    one = perplexity(model, shard_batches(data, 4), num_mc_samples=2, seed=5)
    two = two_ranks(model, data, 4, num_mc_samples=2, seed=5)
    assert two["nll"] == pytest.approx(one["nll"], rel=1e-12)
    assert two["tokens"] == one["tokens"] and two["sequences"] == one["sequences"] == 21


def test_same_weights_in_every_layout_give_the_same_numbers(tmp_path, rng):
    import json

    from model import load_pretrained, save_pretrained
    from tests.model.test_checkpoint import release_config, write_release_ckpt

    source = randomize_(Diffusion(tiny_config()), std=0.1)
    save_pretrained(source, tmp_path / "hf")
    params = [p.detach().clone() for p in source.backbone.parameters()]
    other = randomize_(Diffusion(tiny_config()), seed=9)  # raw weights differ from the EMA
    write_release_ckpt(tmp_path / "r.ckpt", other.backbone, release_config(), params, None)
    ours = tmp_path / "run" / "checkpoints" / "step_0000010"
    ours.mkdir(parents=True)
    names = [f"model.backbone.{n}" for n, _ in source.backbone.named_parameters()]
    (ours / "run.json").write_text(json.dumps({"model_config": source.config.to_dict(),
                                               "zero_stage": 2, "world_size": 1}))
    torch.save({"ema": {"decay": 0.9999, "num_updates": 10, "partitioned": False,
                        "names": names, "shapes": [tuple(p.shape) for p in params],
                        "shadow": params}}, ours / "rank_00000.pt")
    (ours.parent / "latest").write_text("step_0000010")
    data = Rows(torch.randint(0, V - 1, (12, L), generator=rng))
    results = [perplexity(load_pretrained(path), shard_batches(data, 4), seed=1)["nll"]
               for path in (tmp_path / "hf", tmp_path / "r.ckpt", tmp_path / "run")]
    assert results[0] == results[1] == results[2]
