"""Generative perplexity: samples scored by a pretrained causal LM (the judge), counted
exactly as the MDLM release counts them, plus the samples' unigram entropy.

Texts are re-tokenized all at once with the judge's tokenizer (pad = EOS when it has no
pad token; truncated to ``max_length``; padded to the longest), split into batches and into
chunks of the judge's context, and scored by next-token NLL under the padded batch's
attention mask. A position counts when its target is not EOS, or is the first EOS of its
chunk (a real EOS, or the first padding position of a text that has none). Every sample is
scored: the last batch may be smaller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def load_judge(name_or_path: str, device=None):
    """A Hugging Face causal LM and its tokenizer (hub name or local directory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path).eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def judge_context(model) -> int:
    config = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


@torch.no_grad()
def generative_perplexity(texts: list[str], model, tokenizer, max_length: int,
                          batch_size: int = 8, name: str | None = None) -> dict:
    device = next(model.parameters()).device
    enc = tokenizer(texts, return_tensors="pt", return_token_type_ids=False,
                    return_attention_mask=True, truncation=True, padding=True,
                    max_length=max_length)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    eos = tokenizer.eos_token_id
    context = judge_context(model)
    total, count = 0.0, 0.0
    for start in range(0, ids.shape[0], batch_size):
        batch_ids = ids[start:start + batch_size].to(device)
        batch_attn = attn[start:start + batch_size].to(device)
        for chunk, chunk_attn in zip(batch_ids.split(context, dim=-1),
                                     batch_attn.split(context, dim=-1)):
            if chunk.shape[-1] < 2:
                continue
            logits = model(chunk, attention_mask=chunk_attn).logits.float()
            nlls = F.cross_entropy(logits[:, :-1].transpose(1, 2), chunk[:, 1:],
                                   reduction="none")
            first_eos = (chunk == eos).cumsum(-1) == 1
            counted = (first_eos[:, 1:] | (chunk[:, 1:] != eos)).double()
            total += float((nlls.double() * counted).sum())
            count += float(counted.sum())
    nll = total / count
    return {"gen_ppl": math.exp(nll), "gen_nll": nll, "gen_tokens": int(count),
            "judge": name or getattr(model, "name_or_path", "judge")}


def unigram_entropy(token_ids) -> float:
    """Mean over samples of the entropy (natural log) of each sample's token frequencies."""
    values = []
    for row in token_ids:
        row = torch.as_tensor(row).reshape(-1)
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / counts.sum()
        values.append(float(-(p * p.log()).sum()))
    return sum(values) / len(values)
