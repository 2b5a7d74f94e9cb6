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

import contextlib
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
        with clip_bounds(model, *elbo_bounds(model)):
            result = split_bound(engine, dataset, cfg, device)
        if model.parameterization == "bd3lm" and clip_widths(cfg):
            result.update(clip_search(engine, model, dataset, cfg, device))
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


# ---------------------------------------------------------------- block diffusion's clip
def elbo_bounds(model) -> tuple[float, float]:
    """The times of the reported bound: block diffusion's unclipped schedule (the clip its
    training uses gives no bound), or the likelihood itself at blocks of one token when
    the model trains with every token masked. Others: their own."""
    c = model.config
    if model.parameterization != "bd3lm" or (c.blocks == 1 and c.sampling_eps_min >= 1):
        return c.sampling_eps_min, c.sampling_eps_max
    from model.block_diffusion import DEFAULT_EPS_MIN

    return DEFAULT_EPS_MIN, 1.0


@contextlib.contextmanager
def clip_bounds(model, low: float, high: float):
    """The model's clip window set to [low, high] for the duration of a ``with``."""
    c = model.config
    saved = (c.sampling_eps_min, c.sampling_eps_max)
    c.sampling_eps_min, c.sampling_eps_max = low, high
    try:
        yield
    finally:
        c.sampling_eps_min, c.sampling_eps_max = saved


def clip_widths(cfg) -> list[float]:
    return [float(w) for w in (cfg.training.get("clip_search_widths") or [])]


def clip_windows(widths: list[float], delta: float, eps: float) -> list[tuple[float, float]]:
    """The release's candidates: the unclipped (eps, 1), then for each width w the windows
    [i, i + w] for i = 0, delta, ... up to 1 - w (both ends at least eps)."""
    windows = [(eps, 1.0)]
    for width in widths:
        for i in torch.arange(0, 1 - width + delta, delta).tolist():
            window = (max(i, eps), max(i + width, eps))
            if window not in windows:
                windows.append(window)
    return windows


def clip_search(engine, model, dataset, cfg, device) -> dict:
    """BD3-LM's data-driven clip: for each candidate window, the variance over the
    validation rows of the per-block mean loss, summed over up to ``CLIP_SEARCH_BATCHES``
    batches; the window of least variance becomes the model's training clip (unless
    ``training.fix_clipping``). Returns the chosen window and each window's variance."""
    from model.block_diffusion import DEFAULT_EPS_MIN

    training = cfg.training
    windows = clip_windows(clip_widths(cfg), float(training.get("clip_search_delta", 0.05)),
                           DEFAULT_EPS_MIN)
    rank, world = D.rank(), D.world_size()
    batch_size = int(cfg.loader.eval_batch_size)
    n_batches = min(CLIP_SEARCH_BATCHES, math.ceil(len(dataset) / (batch_size * world)))
    block = model.config.blocks
    # n, sum, squares of each window's per-block means, on the device (no sync per window)
    sums = torch.zeros(len(windows), n_batches, 3, dtype=torch.float64, device=device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed) + 20_000 * rank)
    for b in range(n_batches):
        first = (b * world + rank) * batch_size
        rows = [dataset[i] for i in range(first, min(len(dataset), first + batch_size))]
        if not rows:
            continue
        input_ids = torch.stack([r["input_ids"] for r in rows]).to(device)
        mask = torch.stack([r["attention_mask"] for r in rows]).to(device)
        for w, window in enumerate(windows):
            with clip_bounds(model, *window):
                nlls = engine(input_ids, mask, generator=generator).nlls
            per_block = nlls.double().reshape(nlls.shape[0], -1, block).mean(-1).flatten()
            sums[w, b, 0] = per_block.numel()
            sums[w, b, 1] = per_block.sum()
            sums[w, b, 2] = (per_block ** 2).sum()
    sums = D.all_reduce(sums).cpu()
    n, total, squares = sums.unbind(-1)
    variance = ((squares - total ** 2 / n.clamp_min(1)) / (n - 1).clamp_min(1)).sum(-1)
    best = windows[int(variance.argmin())]
    if not bool(training.get("fix_clipping", False)):
        model.config.sampling_eps_min, model.config.sampling_eps_max = best
    out = {"clip_min": best[0], "clip_max": best[1]}
    out.update({f"clip_var_{lo:.2f}-{hi:.2f}": float(v) / max(n_batches, 1)
                for (lo, hi), v in zip(windows, variance)})
    return out


# validation batches the clip search scores (the release's 100)
CLIP_SEARCH_BATCHES = 100


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
