"""``mdlm mode=sample_eval``: samples from a checkpoint, with generative perplexity.

Every rank draws ``sampling.num_sample_batches`` batches of ``loader.eval_batch_size``
samples (``sampling.predictor``: ddpm, ddpm_cache, analytic, ddpm_fast; AR checkpoints
sample autoregressively with a KV cache; ``sampling.semi_ar=True`` slides windows). Rank 0
writes them as JSONL (``text``, ``token_ids``, ``nfe``, ``seconds``) to
``sampling.output_path`` (default ``<run dir>/samples.jsonl``) and a summary beside it
(``samples_summary.json``: samples/s, tokens/s, mean NFE and, with
``eval.compute_generative_perplexity=True``, ``gen_ppl``, ``entropy`` and the judge), which
it also prints last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from evaluation import generative_perplexity, load_judge, unigram_entropy
from pretrain import distributed as D
from pretrain.data.shards import atomic_write_bytes
from pretrain.evaluate import setup
from sampling import ar_sample, sample, semi_ar_sample


def draw(model, cfg, batch_size: int, generator, bos_index: int):
    s = cfg.sampling
    length = int(cfg.model.length)
    gumbel = str(s.get("gumbel_dtype", "float64"))
    if model.parameterization == "ar":
        return ar_sample(model, batch_size, length, bos_index, generator, gumbel)
    kwargs = dict(steps=int(s.steps), predictor=str(s.predictor),
                  noise_removal=bool(s.noise_removal), generator=generator,
                  gumbel_dtype=gumbel)
    if s.semi_ar:
        return semi_ar_sample(model, batch_size, length, int(s.stride_length),
                              int(s.num_strides), **kwargs)
    return sample(model, batch_size, length, **kwargs)


_JUDGES: dict = {}


def judge(name: str, device):
    """The judge ``name`` and its tokenizer, read from disk once per process: periodic
    validation scores samples many times in a run. Between uses it waits in host memory,
    so the accelerator holds it only while it scores."""
    if name not in _JUDGES:
        _JUDGES.clear()
        _JUDGES[name] = load_judge(name)
    model, tokenizer = _JUDGES[name]
    return model.to(device), tokenizer


def score_samples(texts: list[str], token_ids: list[list[int]], cfg, device,
                  generative: bool = True) -> dict:
    """The samples' unigram ``entropy`` and, when ``generative``, their generative
    perplexity under the judge ``eval.gen_ppl_eval_model_name_or_path``."""
    result = {}
    if generative:
        name = str(cfg.eval.gen_ppl_eval_model_name_or_path)
        model, judge_tokenizer = judge(name, device)
        try:
            result.update(generative_perplexity(
                texts, model, judge_tokenizer, max_length=int(cfg.model.length), name=name,
                batch_size=int(cfg.eval.perplexity_batch_size)))
        finally:
            model.to("cpu")
    result["entropy"] = unigram_entropy(token_ids)
    return result


def cut_at_eos(ids: list[int], eos: int, after: int) -> list[int]:
    """Tokens up to and including the first EOS at or after position ``after``."""
    for i in range(after, len(ids)):
        if ids[i] == eos:
            return ids[: i + 1]
    return ids


def run(cfg):
    device, tokenizer, model = setup(cfg)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed) + 7919 * D.rank())
    batch_size = int(cfg.loader.eval_batch_size)
    records = []
    started = time.perf_counter()
    from tqdm import tqdm

    for _ in tqdm(range(int(cfg.sampling.num_sample_batches)), desc="sampling", unit="batch",
                  disable=D.rank() != 0):
        t0 = time.perf_counter()
        tokens, nfe = draw(model, cfg, batch_size, generator, tokenizer.bos_token_id)
        seconds = (time.perf_counter() - t0) / batch_size
        for row in tokens.tolist():
            if cfg.sampling.get("stop_at_eos", False):
                row = cut_at_eos(row, tokenizer.eos_token_id, int(cfg.model.length))
            records.append({"text": tokenizer.decode(row), "token_ids": row, "nfe": nfe,
                            "seconds": seconds})
    elapsed = time.perf_counter() - started
    records = D.gather_lists(records)
    if D.rank() == 0:
        out = Path(str(cfg.sampling.get("output_path") or
                       Path(str(cfg.checkpointing.save_dir)) / "samples.jsonl")).expanduser()
        atomic_write_bytes(out, "".join(json.dumps(r) + "\n" for r in records).encode())
        tokens_total = sum(len(r["token_ids"]) for r in records)
        summary = {
            "samples": len(records), "predictor": str(cfg.sampling.predictor)
            if model.parameterization != "ar" else "ar", "steps": int(cfg.sampling.steps),
            "samples_per_s": len(records) / elapsed,
            "tokens_per_s": tokens_total / elapsed,
            "mean_nfe": sum(r["nfe"] for r in records) / len(records),
            "checkpoint": str(cfg.eval.checkpoint_path), "samples_path": str(out),
        }
        if cfg.eval.compute_generative_perplexity:
            summary.update(score_samples([r["text"] for r in records],
                                         [r["token_ids"] for r in records], cfg, device))
        atomic_write_bytes(out.with_name(out.stem + "_summary.json"),
                           (json.dumps(summary, indent=1) + "\n").encode())
        for r in records[: int(cfg.sampling.get("num_sample_log", 2))]:
            print(r["text"][:500] + "\n---")
        print(json.dumps(summary))
    D.barrier()
    return 0
