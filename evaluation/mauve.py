"""MAUVE (Pillutla et al., 2021) of generated texts against reference texts, with the
``mauve-text`` package and a featurizer of the user's choice.

Features are those ``mauve-text`` computes itself: the featurizer's last hidden state at
each text's last token (texts tokenized by the featurizer's tokenizer and truncated to
``max_length`` and to the featurizer's context), here batched with right padding, which a
causal featurizer cannot see.
The MAUVE paper uses ``gpt2-large``; any Hugging Face model directory or hub name that
``AutoModel`` opens works (tests use a tiny local GPT-2).
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation.genppl import judge_context

_FEATURIZERS: dict = {}


def load_featurizer(name_or_path: str):
    """The model and tokenizer of ``name_or_path``, read once per process."""
    if name_or_path not in _FEATURIZERS:
        from transformers import AutoModel, AutoTokenizer

        _FEATURIZERS.clear()
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        _FEATURIZERS[name_or_path] = (AutoModel.from_pretrained(name_or_path).eval(),
                                      tokenizer)
    return _FEATURIZERS[name_or_path]


@torch.no_grad()
def features(texts: list[str], model, tokenizer, max_length: int = 1024,
             batch_size: int = 8) -> np.ndarray:
    """(len(texts), hidden) float32 features: the last layer at each text's last token."""
    device = next(model.parameters()).device
    max_length = min(max_length, judge_context(model))  # never past the featurizer's context
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length, return_token_type_ids=False)
        ids, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True,
                       return_dict=True).hidden_states[-1]
        last = (attention.sum(-1) - 1).clamp_min(0)
        out.append(hidden[torch.arange(ids.shape[0], device=device), last].float().cpu())
    return torch.cat(out).numpy()


def mauve_score(texts: list[str], references: list[str], featurizer: str, device=None,
                max_length: int = 1024, batch_size: int = 8, scaling_factor: float = 5.0,
                num_buckets="auto", seed: int = 25) -> dict:
    """MAUVE of ``texts`` against ``references`` (``mauve``, in (0, 1]; 1: the same
    distribution) under the featurizer ``featurizer``."""
    import mauve

    model, tokenizer = load_featurizer(featurizer)
    if device is not None:
        model.to(device)
    try:
        p = features(texts, model, tokenizer, max_length, batch_size)
        q = features(references, model, tokenizer, max_length, batch_size)
    finally:
        model.to("cpu")
    result = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=num_buckets,
                                 mauve_scaling_factor=scaling_factor, seed=seed,
                                 verbose=False)
    return {"mauve": float(result.mauve), "mauve_featurizer": featurizer,
            "mauve_references": len(references)}
