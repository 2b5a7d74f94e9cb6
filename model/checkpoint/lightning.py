"""PyTorch Lightning ``.ckpt`` files as written by the MDLM release (MDLM, AR and SEDD).

Layout: ``state_dict`` with ``backbone.*`` keys; ``hyper_parameters["config"]`` holding the
run's Hydra config (model sizes, backbone, parameterization, time conditioning, T, noise)
and ``hyper_parameters["tokenizer"]``; ``ema["shadow_params"]``, a list following the order
of the backbone's parameters (its buffers excluded).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint.keys import PREFIX, strip_prefix
from model.errors import CheckpointError

BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


def read_ckpt(path: Path) -> dict:
    # The release pickles its Hydra config and tokenizer into the file, which a
    # weights-only unpickler refuses; load only files you trust.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which and stop
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {err}); "
            "the file may be truncated or not a .ckpt: download or copy it again."
        ) from err


def _get(node, dotted: str, default=None):
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node[part] if part in node else None
        except TypeError:
            node = getattr(node, part, None)
    return default if node is None else node


def config_values(ckpt: dict, state: dict) -> dict:
    """ModelConfig values recorded in the checkpoint's hyper-parameters and weights."""
    hparams = ckpt.get("hyper_parameters") or {}
    cfg = _get(hparams, "config", {})
    values = {}
    backbone = _get(cfg, "backbone")
    if backbone is not None:
        if backbone not in ("dit", "hf_dit", "ar"):
            raise CheckpointError(f"the checkpoint's backbone={backbone} is not supported "
                                  "here; only DiT (dit) and AR (ar) networks load.")
        values["backbone"] = "ar" if backbone == "ar" else "dit"
    for key in ("parameterization", "time_conditioning", "T", "subs_masking"):
        if _get(cfg, key) is not None:
            values[key] = _get(cfg, key)
    for key in ("hidden_size", "cond_dim", "n_blocks", "n_heads", "dropout", "length"):
        if _get(cfg, f"model.{key}") is not None:
            values[key] = _get(cfg, f"model.{key}")
    noise = _get(cfg, "noise")
    if noise is not None:
        values["noise"] = {k: noise[k] for k in noise}
    for key in ("antithetic_sampling", "importance_sampling", "change_of_variables",
                "sampling_eps"):
        if _get(cfg, f"training.{key}") is not None:
            values[key] = _get(cfg, f"training.{key}")
    embedding = state.get("vocab_embed.embedding")
    if embedding is not None:
        values["vocab_size"] = int(embedding.shape[0])
    tokenizer = hparams.get("tokenizer") if hasattr(hparams, "get") else None
    if getattr(tokenizer, "mask_token", None) is not None:
        values["mask_index"] = tokenizer.mask_token_id
    elif "vocab_size" in values:
        values["mask_index"] = values["vocab_size"] - 1
    if tokenizer is not None:
        values["bos_index"] = getattr(tokenizer, "bos_token_id", None)
        values["eos_index"] = getattr(tokenizer, "eos_token_id", None)
    return values


def ema_state(ckpt: dict, state: dict, path: Path) -> dict:
    """The backbone's weights with the EMA shadow parameters in place of the raw ones.

    The shadow list follows the backbone's parameter order: the checkpoint's own
    ``backbone.*`` keys in order, buffers left out. Count and every shape are checked.
    """
    shadow = list(ckpt["ema"]["shadow_params"])
    names = [k for k in state if not k.endswith(BUFFER_SUFFIXES)]
    if len(shadow) != len(names):
        raise CheckpointError(
            f"{path}: the EMA holds {len(shadow)} tensors but the backbone has {len(names)} "
            "parameters; the file is not a release checkpoint of this network. Load the raw "
            "weights with use_ema=False (eval.disable_ema=True) if you trust them."
        )
    merged = dict(state)
    for name, tensor in zip(names, shadow):
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"{path}: EMA tensor for {name} has shape {tuple(tensor.shape)} but the weight "
                f"has {tuple(state[name].shape)}; the EMA does not follow the backbone's "
                "parameter order. Use use_ema=False to load the raw weights."
            )
        merged[name] = tensor
    return merged


def read(path: Path, use_ema: bool) -> tuple[dict, dict, bool]:
    """(config values, backbone state without prefix, whether EMA weights were used)."""
    ckpt = read_ckpt(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} has no 'state_dict'; it is not a Lightning checkpoint of the MDLM release."
        )
    state = strip_prefix(ckpt["state_dict"], PREFIX)
    if not state:
        raise CheckpointError(
            f"{path} holds no '{PREFIX}*' weights; it is not a checkpoint of an MDLM model."
        )
    values = config_values(ckpt, state)
    used_ema = False
    if use_ema and ckpt.get("ema"):
        state = ema_state(ckpt, state, path)
        used_ema = True
    return values, state, used_ema
