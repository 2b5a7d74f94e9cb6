"""PyTorch Lightning ``.ckpt`` files as written by the MDLM release (MDLM, AR and SEDD).

Layout: ``state_dict`` with ``backbone.*`` keys; ``hyper_parameters["config"]`` holding the
run's Hydra config (model sizes, backbone, parameterization, time conditioning, T, noise)
and ``hyper_parameters["tokenizer"]``; ``ema["shadow_params"]``, a list following the order
of the backbone's parameters (its buffers excluded).

The file is read through the ``RELEASE`` allowlist of ``model.checkpoint.safe``: tensors,
containers and the OmegaConf config load; the tokenizer and anything else stay inert
placeholders, reported in one line (the special-token ids are read from the tokenizer's
pickled state). ``trust=True`` loads the whole file as ``torch.load`` would.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import safe
from model.checkpoint.keys import PREFIX, strip_prefix
from model.checkpoint.pickled_tokenizer import special_ids
from model.errors import CheckpointError

BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


def read_ckpt(path: Path, trust: bool = False) -> tuple[dict, list[str]]:
    """(the checkpoint's contents read through the release allowlist, the globals left
    out as placeholders); a full load if ``trust``."""
    try:
        return safe.load(path, safe.RELEASE, trust=trust, lenient=True)
    except CheckpointError:
        raise
    except Exception as err:  # a truncated or foreign file: say which and stop
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {err}); "
            "the file may be truncated or not a .ckpt: download or copy it again."
        ) from err


def _get(node, dotted: str, default=None, source="the checkpoint"):
    """The value at ``dotted`` (a config value, never a placeholder of a refused global)."""
    for part in dotted.split("."):
        if node is None:
            return default
        safe.require(node, source, "hyper_parameters")
        try:
            node = node[part] if part in node else None
        except TypeError:
            node = getattr(node, part, None)
    return default if node is None else safe.require(node, source, "hyper_parameters")


def config_values(ckpt: dict, state: dict, source="the checkpoint") -> dict:
    """ModelConfig values recorded in the checkpoint's hyper-parameters and weights."""
    hparams = ckpt.get("hyper_parameters") or {}
    cfg = _get(hparams, "config", {}, source)

    def get(dotted: str):
        return _get(cfg, dotted, source=source)

    values = {}
    backbone = get("backbone")
    if backbone is not None:
        if backbone not in ("dit", "hf_dit", "ar"):
            raise CheckpointError(f"the checkpoint's backbone={backbone} is not supported "
                                  "here; only DiT (dit) and AR (ar) networks load.")
        values["backbone"] = "ar" if backbone == "ar" else "dit"
    for key in ("parameterization", "time_conditioning", "T", "subs_masking"):
        if get(key) is not None:
            values[key] = get(key)
    for key in ("hidden_size", "cond_dim", "n_blocks", "n_heads", "dropout", "length"):
        if get(f"model.{key}") is not None:
            values[key] = get(f"model.{key}")
    noise = get("noise")
    if noise is not None:
        values["noise"] = {k: noise[k] for k in noise}
    for key in ("antithetic_sampling", "importance_sampling", "change_of_variables",
                "sampling_eps"):
        if get(f"training.{key}") is not None:
            values[key] = get(f"training.{key}")
    embedding = state.get("vocab_embed.embedding")
    if embedding is not None:
        values["vocab_size"] = int(embedding.shape[0])
    tokenizer = hparams.get("tokenizer") if hasattr(hparams, "get") else None
    ids = special_ids(tokenizer)
    if ids.get("mask_token") is not None:
        values["mask_index"] = ids["mask_token"]
    elif "vocab_size" in values:
        values["mask_index"] = values["vocab_size"] - 1
    if tokenizer is not None:
        values["bos_index"] = ids.get("bos_token")
        values["eos_index"] = ids.get("eos_token")
    return values


def _tensors(items, path: Path, what: str):
    """``items`` (name, value) pairs, each value a tensor; a placeholder stops the load."""
    for name, value in items:
        safe.require(value, path, f"{what} {name}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {what} {name} is a {type(value).__name__}, not a "
                                  "tensor; the file is not a checkpoint of an MDLM model.")


def ema_state(ckpt: dict, state: dict, path: Path) -> dict:
    """The backbone's weights with the EMA shadow parameters in place of the raw ones.

    The shadow list follows the backbone's parameter order: the checkpoint's own
    ``backbone.*`` keys in order, buffers left out. Count and every shape are checked.
    """
    ema = safe.require(ckpt["ema"], path, "EMA")
    shadow = list(safe.require(ema["shadow_params"], path, "EMA"))
    _tensors(enumerate(shadow), path, "EMA tensor")
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


def read(path: Path, use_ema: bool, trust: bool = False) -> tuple[dict, dict, bool]:
    """(config values, backbone state without prefix, whether EMA weights were used)."""
    ckpt, refused = read_ckpt(path, trust)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} has no 'state_dict'; it is not a Lightning checkpoint of the MDLM release."
        )
    state = strip_prefix(safe.require(ckpt["state_dict"], path, "state_dict"), PREFIX)
    _tensors(state.items(), path, "weight")
    if not state:
        raise CheckpointError(
            f"{path} holds no '{PREFIX}*' weights; it is not a checkpoint of an MDLM model."
        )
    values = config_values(ckpt, state, path)
    used_ema = False
    if use_ema and ckpt.get("ema"):
        state = ema_state(ckpt, state, path)
        used_ema = True
    safe.report(path, refused)
    return values, state, used_ema
