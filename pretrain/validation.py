"""Validation during training, with the EMA weights swapped in (as the release does).

- The bound on the validation split: NLL, PPL, BPD and the token count. Every rank runs the
  same number of batches (padding batches count zero) so ZeRO-3's gathers stay in step.
- With ``eval.generate_samples=True`` (the release's default): every rank draws
  ``sampling.num_sample_batches`` batches of ``loader.eval_batch_size`` samples with
  ``sampling.predictor`` and ``sampling.steps``; rank 0 writes them all to
  ``<run dir>/samples/step_<step>.jsonl``, shows the first ``sampling.num_sample_log`` in
  TensorBoard and reports their unigram ``entropy``, and with
  ``eval.compute_generative_perplexity=True`` their ``gen_ppl`` under the judge
  ``eval.gen_ppl_eval_model_name_or_path``. The release skips this for AR; here AR
  samples with its KV cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pretrain import distributed as D

LN2 = math.log(2)


@torch.no_grad()
def validate(engine, model, ema, dataset, cfg, device, *, tokenizer=None, step: int = 0,
             run_dir: Path | None = None, metrics=None) -> dict:
    """The validation metrics of the EMA weights (``val/`` keys without the prefix). The
    sample metrics come back on rank 0 only."""
    if ema is not None:
        ema.swap_in(engine)
    engine.eval()
    try:
        result = split_bound(engine, dataset, cfg, device)
        if tokenizer is not None and wants_samples(cfg):
            result.update(samples(engine, model, cfg, tokenizer, device, step, run_dir,
                                  metrics))
    finally:
        engine.train()
        if ema is not None:
            ema.swap_out(engine)
    return result


def split_bound(engine, dataset, cfg, device) -> dict:
    rank, world = D.rank(), D.world_size()
    batch_size = int(cfg.loader.eval_batch_size)
    n = len(dataset)
    limit = cfg.trainer.get("limit_val_batches", 1.0)
    total_batches = math.ceil(n / batch_size)
    if isinstance(limit, float) and limit <= 1.0:
        total_batches = max(1, int(total_batches * limit))
    else:
        total_batches = min(total_batches, int(limit))
    indices = list(range(min(n, total_batches * batch_size)))
    per_rank = math.ceil(len(indices) / world)
    mine = indices[rank * per_rank:(rank + 1) * per_rank]
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed) + 10_000 * rank)
    nll, tokens = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for start in range(0, per_rank, batch_size):
        chunk = mine[start:start + batch_size]
        weight = 1.0 if chunk else 0.0
        rows = [dataset[i] for i in (chunk or [0])]
        input_ids = torch.stack([r["input_ids"] for r in rows]).to(device)
        mask = torch.stack([r["attention_mask"] for r in rows]).to(device)
        out = engine(input_ids, mask, generator=generator)
        nll += weight * out.nlls.double().sum().cpu()
        tokens += weight * out.token_mask.double().sum().cpu()
    total = D.all_reduce(torch.stack([nll, tokens]).to(device))
    mean = float(total[0] / total[1])
    return {"nll": mean, "ppl": math.exp(mean), "bpd": mean / LN2, "tokens": float(total[1])}


def wants_samples(cfg) -> bool:
    return bool(cfg.eval.get("generate_samples", False)) and int(
        cfg.sampling.num_sample_batches) > 0


def check_sampling(cfg) -> None:
    """The sampler settings of validation (every ``sampling.*`` value, and the predictor
    against the model's settings), checked before training starts rather than at the first
    validation."""
    if not bool(cfg.eval.get("generate_samples", False)):
        return
    from pretrain.sample import knobs_of

    knobs_of(cfg)


def whole_model(engine, model, device):
    """``model`` itself, or under ZeRO-3 an ordinary copy of it with every parameter
    gathered: ranks then sample independently (their numbers of network calls differ),
    which ZeRO-3's per-module gathers cannot do."""
    if engine.zero_optimization_stage() < 3:
        return model
    import deepspeed

    from model import Diffusion

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        copy = Diffusion(model.config).to(device).eval()  # its init must not draw from the
        # global RNG, which the training that follows goes on from
    params = dict(model.named_parameters())
    sources = {**dict(model.named_buffers()), **params}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        copy.load_state_dict({k: sources[k].data for k in copy.state_dict()})
    return copy


def samples(engine, model, cfg, tokenizer, device, step: int, run_dir: Path | None,
            metrics) -> dict:
    from pretrain.data.shards import atomic_write_bytes
    from pretrain.sample import decode, draw, knobs_of, score_samples

    knobs = knobs_of(cfg)
    sampler = whole_model(engine, model, device)
    generator = torch.Generator(device=device).manual_seed(
        int(cfg.seed) + 7919 * D.rank() + 104_729 * step)
    rows, nfes = [], []
    for _ in range(knobs.num_sample_batches):
        batch_rows, nfe = draw(sampler, cfg, int(cfg.loader.eval_batch_size), generator,
                               tokenizer.bos_token_id, knobs)
        rows += batch_rows
        nfes.append(nfe)
    del sampler
    rows = D.gather_lists(rows)
    result = {}
    if D.rank() == 0:
        texts = decode(tokenizer, rows)
        if run_dir is not None:
            atomic_write_bytes(Path(run_dir) / "samples" / f"step_{step:08d}.jsonl", "".join(
                json.dumps({"text": t, "token_ids": r}) + "\n"
                for t, r in zip(texts, rows)).encode())
        if metrics is not None:
            metrics.text(step, "val/samples", texts[: int(cfg.sampling.num_sample_log)])
        scored = score_samples(texts, rows, cfg, device,
                               generative=bool(cfg.eval.compute_generative_perplexity))
        result = {k: scored[k] for k in ("entropy", "gen_ppl", "gen_nll") if k in scored}
        result["sample_nfe"] = sum(nfes) / len(nfes)
    D.barrier()
    return result
