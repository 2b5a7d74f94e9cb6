"""The special-token ids of the tokenizer a release ``.ckpt`` pickles, without loading it.

A safe load leaves the tokenizer out (a ``Refused`` placeholder holding the pickled
state); the mask, BOS and EOS ids the model config needs are read from that state:
the token strings from the tokenizer's attributes, their ids from the vocabulary (the
``tokenizers`` JSON a fast tokenizer pickles, or a slow tokenizer's vocabulary dict).
A tokenizer that was fully loaded (``trust=True``) answers directly.
"""

from __future__ import annotations

import json

from model.checkpoint.safe import Refused

NAMES = ("mask_token", "bos_token", "eos_token")


def _state(obj) -> dict:
    state = obj.state if isinstance(obj, Refused) else None
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
        state = state[0]
    return state if isinstance(state, dict) else {}


def _text(value) -> str | None:
    """A special token as text: a string, an AddedToken (loaded or not) or its dict."""
    if isinstance(value, Refused):
        value = _state(value)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    return value if isinstance(value, str) else getattr(value, "content", None)


def _token(state: dict, name: str) -> str | None:
    special = state.get("_special_tokens_map")
    for value in ((special or {}).get(name) if isinstance(special, dict) else None,
                  state.get(f"_{name}"), (state.get("init_kwargs") or {}).get(name)):
        text = _text(value)
        if text:
            return text
    return None


def _vocabulary(state: dict) -> dict:
    """{token: id} from the pickled state: backend JSON, slow vocabularies, added tokens."""
    vocab = {}
    backend = state.get("_tokenizer")
    raw = backend.state if isinstance(backend, Refused) else None
    if isinstance(raw, (bytes, str)):
        spec = json.loads(raw)
        model_vocab = (spec.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):
            vocab.update(model_vocab)
        elif isinstance(model_vocab, list):  # Unigram: [piece, score] in id order
            vocab.update({entry[0]: i for i, entry in enumerate(model_vocab)})
        vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens") or []})
    for key in ("encoder", "vocab", "added_tokens_encoder"):
        if isinstance(state.get(key), dict):
            vocab.update(state[key])
    decoder = state.get("_added_tokens_decoder")
    if isinstance(decoder, dict):
        vocab.update({_text(token): i for i, token in decoder.items() if _text(token)})
    return vocab


def special_ids(tokenizer) -> dict:
    """{'mask_token': id or None, 'bos_token': ..., 'eos_token': ...}."""
    if tokenizer is None:
        return {}
    if not isinstance(tokenizer, Refused):
        ids = {name: getattr(tokenizer, f"{name}_id", None) for name in NAMES}
        if getattr(tokenizer, "mask_token", None) is None:
            ids["mask_token"] = None
        return ids
    state = _state(tokenizer)
    vocab = _vocabulary(state)
    return {name: vocab.get(_token(state, name)) for name in NAMES}
