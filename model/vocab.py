"""The model vocabulary implied by a tokenizer, as the MDLM release defines it."""

from __future__ import annotations


def mask_and_vocab(tokenizer) -> tuple[int, int]:
    """Returns (mask_index, vocab_size) for a Hugging Face tokenizer.

    A tokenizer with a mask token (BERT's [MASK]) uses it and the model's vocabulary is the
    tokenizer's base vocabulary. Otherwise the mask id is the base vocabulary size
    (``tokenizer.vocab_size``, which leaves out added tokens) and the vocabulary is one larger:
    GPT-2 gives mask id 50257 and 50258 logits.
    """
    vocab_size = tokenizer.vocab_size
    if getattr(tokenizer, "mask_token", None) is not None:
        return tokenizer.mask_token_id, vocab_size
    return vocab_size, vocab_size + 1


def tokenizer_ids(tokenizer) -> dict:
    """The ModelConfig fields a tokenizer decides: vocabulary, [MASK], BOS and EOS ids
    (CLS and SEP where a tokenizer has no BOS or EOS)."""
    mask_index, vocab_size = mask_and_vocab(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return dict(
        vocab_size=vocab_size,
        mask_index=mask_index,
        bos_index=bos if bos is not None else getattr(tokenizer, "cls_token_id", None),
        eos_index=eos if eos is not None else getattr(tokenizer, "sep_token_id", None),
    )
