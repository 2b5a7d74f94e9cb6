"""``mdlm mode=sample_eval``: samples from a checkpoint, with generative perplexity and MAUVE.

Every rank draws ``sampling.num_sample_batches`` batches of ``loader.eval_batch_size``
samples (``sampling.predictor``: any registered predictor, see ``sampling.PREDICTORS``; AR
checkpoints sample autoregressively with a KV cache; ``sampling.semi_ar=True`` slides
windows). The ``sampling.*`` values are checked before the checkpoint is read. Rank 0
writes them as JSONL (``text``, ``token_ids``, ``nfe``, ``seconds``) to
``sampling.output_path`` (default ``<run dir>/samples.jsonl``) and a summary beside it
(``samples_summary.json``: samples/s, tokens/s, mean NFE, ``entropy`` and, with
``eval.compute_generative_perplexity=True``, ``gen_ppl`` and the judge; with
``eval.compute_mauve=True``, ``mauve`` against as many validation-split texts), which it
also prints last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from evaluation import generative_perplexity, load_judge, mauve_score, unigram_entropy
from pretrain import distributed as D
from pretrain.data.shards import atomic_write_bytes
from pretrain.evaluate import setup
from sampling import Knobs, ar_sample, check_model, sample, semi_ar_sample
from sampling.blocks import block_sample


def knobs_of(cfg) -> Knobs:
    """The sampler's knobs from ``sampling.*``, each value checked, and checked against the
    run's model settings (so a bad value stops before any checkpoint is read)."""
    knobs = Knobs.from_config(cfg.sampling)
    check_model(knobs, str(cfg.parameterization), bool(cfg.time_conditioning),
                str(cfg.noise.type), int(cfg.model.length))
    return knobs


def draw(model, cfg, batch_size: int, generator, bos_index: int,
         knobs: Knobs | None = None) -> tuple[list[list[int]], int]:
    """One batch of samples as token rows, and the network calls it took. Block diffusion
    samples ``model.length`` tokens whatever the checkpoint's context (its window)."""
    knobs = knobs or knobs_of(cfg)
    length = int(cfg.model.length)
    if model.parameterization == "bd3lm":
        tokens, lengths, nfe = block_sample(
            model, batch_size, length, int(knobs.steps), predictor=knobs.predictor,
            generator=generator, kv_cache=bool(knobs.kv_cache), temperature=knobs.temperature,
            top_p=knobs.top_p, stop_at_eos=bool(knobs.var_length),
            min_entropy=VAR_LENGTH_ENTROPY if knobs.var_length else None,
            gumbel_dtype=knobs.gumbel_dtype)
        return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())], nfe
    if model.parameterization == "ar":
        tokens, nfe = ar_sample(model, batch_size, length, bos_index, generator,
                                knobs.gumbel_dtype, temperature=knobs.temperature,
                                top_p=knobs.top_p)
    elif knobs.semi_ar:
        tokens, nfe = semi_ar_sample(model, batch_size, length, int(knobs.stride_length),
                                     int(knobs.num_strides), knobs=knobs, generator=generator)
    else:
        tokens, nfe = sample(model, batch_size, length, knobs, generator=generator)
    return tokens.tolist(), nfe


# block diffusion's variable-length rule (the BD3-LM release's): stop when the unigram
# entropy of the last 256 tokens falls below this many nats
VAR_LENGTH_ENTROPY = 4.0


# transformers 4.38's clean_up_tokenization, which its decode applied by default (later
# versions skip it for BPE tokenizers such as GPT-2's, whatever the argument)
CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
             (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_spaces(text: str) -> str:
    for old, new in CLEAN_UPS:
        text = text.replace(old, new)
    return text


def decode(tokenizer, rows) -> list[str]:
    """Texts as the judge reads them: tokenization spaces cleaned up, as the release's
    transformers 4.38 decoded by default (so gen-ppl is comparable with its numbers)."""
    return [clean_up_spaces(text) for text in
            tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False)]


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
        # semi-AR samples are longer than model.length: each is scored over its full length
        max_length = max([int(cfg.model.length)] + [len(ids) for ids in token_ids])
        try:
            result.update(generative_perplexity(
                texts, model, judge_tokenizer, max_length=max_length, name=name,
                batch_size=int(cfg.eval.perplexity_batch_size)))
        finally:
            model.to("cpu")
    result["entropy"] = unigram_entropy(token_ids)
    return result


def reference_texts(cfg, tokenizer, n: int) -> list[str]:
    """The first ``n`` blocks of the validation split (``data.valid``), decoded as the
    samples are, without their padding."""
    from pretrain.data.datasets import open_split

    dataset = open_split(cfg, "valid", tokenizer, progress=False)
    rows = [dataset[i] for i in range(min(n, len(dataset)))]
    ids = [r["input_ids"][r["attention_mask"].bool()].tolist() for r in rows]
    return decode(tokenizer, ids)


def score_mauve(texts: list[str], cfg, tokenizer, device) -> dict:
    """MAUVE of the samples against as many validation texts, under the featurizer
    ``eval.mauve_featurizer``."""
    references = reference_texts(cfg, tokenizer, len(texts))
    return mauve_score(texts, references, str(cfg.eval.get("mauve_featurizer", "gpt2-large")),
                       device, max_length=int(cfg.eval.get("mauve_max_length", 1024)),
                       batch_size=int(cfg.eval.perplexity_batch_size),
                       scaling_factor=float(cfg.eval.get("mauve_scaling_factor", 5.0)))


def cut_at_eos(ids: list[int], eos: int, after: int) -> list[int]:
    """Tokens up to and including the first EOS at or after position ``after``."""
    for i in range(after, len(ids)):
        if ids[i] == eos:
            return ids[: i + 1]
    return ids


def check_mauve(cfg) -> None:
    """The MAUVE settings, checked before anything is loaded."""
    from model.errors import UserError

    e = cfg.eval
    if not e.get("compute_mauve", False):
        return
    if not str(e.get("mauve_featurizer") or ""):
        raise UserError("eval.compute_mauve=True needs eval.mauve_featurizer, a model name "
                        "or directory such as gpt2-large.")
    for key, low in (("mauve_max_length", 1), ("mauve_scaling_factor", 0)):
        value = e.get(key)
        try:
            ok = float(value) > low if low == 0 else int(value) >= low
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"eval.{key}={value} must be {'positive' if low == 0 else 'at least 1'}"
                            f"; the defaults are 1024 tokens and a factor of 5.")


def run(cfg):
    knobs = knobs_of(cfg)
    check_mauve(cfg)
    device, tokenizer, model = setup(cfg)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed) + 7919 * D.rank())
    batch_size = int(cfg.loader.eval_batch_size)
    records = []
    started = time.perf_counter()
    from tqdm import tqdm

    for _ in tqdm(range(knobs.num_sample_batches), desc="sampling", unit="batch",
                  disable=D.rank() != 0):
        t0 = time.perf_counter()
        rows, nfe = draw(model, cfg, batch_size, generator, tokenizer.bos_token_id, knobs)
        seconds = (time.perf_counter() - t0) / batch_size
        if cfg.sampling.get("stop_at_eos", False):
            rows = [cut_at_eos(row, tokenizer.eos_token_id, int(cfg.model.length))
                    for row in rows]
        records += [{"text": text, "token_ids": row, "nfe": nfe, "seconds": seconds}
                    for text, row in zip(decode(tokenizer, rows), rows)]
    elapsed = time.perf_counter() - started
    records = D.gather_lists(records)
    if D.rank() == 0:
        out = Path(str(cfg.sampling.get("output_path") or
                       Path(str(cfg.checkpointing.save_dir)) / "samples.jsonl")).expanduser()
        atomic_write_bytes(out, "".join(json.dumps(r) + "\n" for r in records).encode())
        tokens_total = sum(len(r["token_ids"]) for r in records)
        summary = {
            "samples": len(records), "predictor": knobs.predictor
            if model.parameterization != "ar" else "ar", "steps": knobs.steps,
            "top_p": knobs.top_p, "temperature": knobs.temperature,
            "samples_per_s": len(records) / elapsed,
            "tokens_per_s": tokens_total / elapsed,
            "mean_nfe": sum(r["nfe"] for r in records) / max(len(records), 1),
            "checkpoint": str(cfg.eval.checkpoint_path), "samples_path": str(out),
        }
        texts = [r["text"] for r in records]
        if records:
            summary.update(score_samples(
                texts, [r["token_ids"] for r in records], cfg, device,
                generative=bool(cfg.eval.compute_generative_perplexity)))
        if records and cfg.eval.get("compute_mauve", False):
            summary.update(score_mauve(texts, cfg, tokenizer, device))
        atomic_write_bytes(out.with_name(out.stem + "_summary.json"),
                           (json.dumps(summary, indent=1) + "\n").encode())
        for r in records[: int(cfg.sampling.get("num_sample_log", 2))]:
            print(r["text"][:500] + "\n---")
        print(json.dumps(summary))
    D.barrier()
    return 0
