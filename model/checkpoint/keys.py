"""Matching a checkpoint's tensors to a model, with errors that name what does not fit."""

from __future__ import annotations

import torch
import torch.nn as nn

from model.errors import CheckpointError

# Buffers that a checkpoint may lack: recomputed from the architecture.
OPTIONAL_BUFFERS = ("rotary_emb.inv_freq",)
PREFIX = "backbone."


def strip_prefix(state: dict, prefix: str = PREFIX) -> dict:
    """Keys under ``prefix`` with the prefix removed; other keys are dropped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _listing(items: list, limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_and_load(backbone: nn.Module, state: dict, source: str, ignore: tuple = ()) -> None:
    """Loads ``state`` (backbone keys, no prefix) into ``backbone`` or raises CheckpointError
    naming the missing, unexpected and mis-shaped keys."""
    expected = backbone.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_BUFFERS)]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        if mis_shaped:
            parts.append(f"shape mismatches (checkpoint vs model): {_listing(mis_shaped)}")
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise CheckpointError(
            f"{source} does not fit a {type(backbone).__name__} with "
            f"{_describe(backbone)}: " + "; ".join(parts)
            + ". Check the architecture and vocabulary overrides (model size, backbone, "
            "tokenizer) against the checkpoint."
        )
    with torch.no_grad():
        for name, tensor in backbone.state_dict(keep_vars=True).items():
            if name in state:
                tensor.copy_(state[name].to(tensor.dtype))


def _describe(backbone: nn.Module) -> str:
    c = backbone.config
    return (f"vocab_size={c.vocab_size}, hidden_size={c.hidden_size}, n_blocks={c.n_blocks}, "
            f"n_heads={c.n_heads}, cond_dim={c.cond_dim}")
