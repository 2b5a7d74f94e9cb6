"""``load_pretrained``: one entry point for every checkpoint layout."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model.checkpoint import hf, lightning, ours
from model.checkpoint.keys import check_and_load, strip_prefix
from model.config import ModelConfig, check_field_names
from model.errors import CheckpointError

log = logging.getLogger(__name__)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def load_pretrained(path_or_hub_id, use_ema: bool = True, device=None, revision=None,
                    trust: bool = False, **overrides):
    """Returns a ready ``Diffusion`` model (in eval mode) from a checkpoint.

    Accepts an HF directory or hub id in the ``kuleshov-group/mdlm-owt`` layout, a
    Lightning ``.ckpt`` of the MDLM release, or one of this project's training checkpoints
    (a run directory, its ``checkpoints/`` directory or one checkpoint's directory).
    ``overrides`` are ModelConfig fields (``time_conditioning=True``,
    ``parameterization='sedd'``, ``T=1000`` ...) and win over what the checkpoint records.
    ``use_ema=False`` loads the raw weights instead of the EMA (``eval.disable_ema=True``).

    Pickled files are read without running code from them: only tensors, containers and
    the types the release's and our checkpoints need are loaded (``model.checkpoint.safe``);
    ``trust=True`` (``eval.trust_checkpoint=True``) loads a file you trust fully.
    """
    from model.diffusion import Diffusion

    check_field_names(overrides)
    values, state, used_ema, source = _read_checked(path_or_hub_id, use_ema, trust, revision)
    _check_block_diffusion_kept(values, overrides, source)
    values.update(overrides)
    config = ModelConfig.from_dict(values)
    model = Diffusion(config)
    check_and_load(model.backbone, state, source)
    log.info("loaded %s (%s weights)", source, "EMA" if used_ema else "raw")
    model.eval()
    if device is not None:
        model.to(torch.device(device))
    return model


def _check_block_diffusion_kept(values: dict, overrides: dict, source: str) -> None:
    """A checkpoint trained as block diffusion with blocks shorter than its context saw
    only earlier blocks: read as another objective (the run's default, subs, when
    parameterization is not given), its weights would score a different model."""
    wanted = overrides.get("parameterization")
    if values.get("parameterization") != "bd3lm" or wanted in (None, "bd3lm"):
        return
    length = values.get("length")
    block = values.get("block_size") or length
    if length is not None and block < length:
        raise CheckpointError(
            f"{source} was trained as parameterization=bd3lm with block_size={block} but "
            f"is read as parameterization={wanted}; add parameterization=bd3lm (or "
            "algo=bd3lm) to evaluate or sample it as block diffusion.")


def load_weights(backbone, path_or_hub_id, use_ema: bool = True, trust: bool = False,
                 revision=None) -> str:
    """Copies a checkpoint's weights (any layout ``load_pretrained`` reads) into
    ``backbone`` with the same strict key and shape checks, whatever objective either was
    trained with (``training.from_pretrained``: BD3-LM fine-tunes from an MDLM). Returns
    what was read."""
    _, state, used_ema, source = _read_checked(path_or_hub_id, use_ema, trust, revision)
    check_and_load(backbone, state, source)
    return f"{source} ({'EMA' if used_ema else 'raw'} weights)"


def _read_checked(path_or_hub_id, use_ema: bool, trust: bool, revision):
    """``_read``, a damaged or foreign file reported as one CheckpointError."""
    path = Path(str(path_or_hub_id)).expanduser()
    try:
        return _read(path_or_hub_id, path, use_ema, trust, revision)
    except CheckpointError:
        raise
    except _READ_ERRORS as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise CheckpointError(
            f"could not read the checkpoint {path} ({type(err).__name__}"
            f"{': ' + detail if detail else ''}); it is truncated or not a checkpoint of a "
            "kind this loads: copy, download or export it again."
        ) from err


def _read(path_or_hub_id, path: Path, use_ema: bool, trust: bool, revision):
    """(config values, state dict, whether EMA weights were used, what was read)."""
    ours_dir = ours.locate(path) if path.is_dir() else None
    if ours_dir is not None:
        values, state, used_ema = ours.read(ours_dir, use_ema, trust)
        return values, strip_prefix(state), used_ema, f"checkpoint {ours_dir}"
    if path.is_file():
        return (*lightning.read(path, use_ema, trust), f"checkpoint {path}")
    if hf.is_hf_dir(path):
        return (*_read_hf(path), f"HF directory {path}")
    if path.exists():
        raise CheckpointError(
            f"{path} is neither a .ckpt file nor a directory with config.json; point it at "
            "a Lightning checkpoint or an HF-layout model directory."
        )
    if _looks_like_hub_id(str(path_or_hub_id)):
        directory = hf.download(str(path_or_hub_id), revision)
        return (*_read_hf(directory), f"hub model {path_or_hub_id}")
    raise CheckpointError(
        f"{path_or_hub_id!r} does not exist and is not a hub id like 'org/name'; "
        "check the path."
    )


def _read_errors() -> tuple:
    """What reading a damaged or foreign file raises (safetensors, pickle, zip, JSON)."""
    import pickle
    import zipfile

    errors = [OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError,
              zipfile.BadZipFile, UnicodeDecodeError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


_READ_ERRORS = _read_errors()


def _read_hf(directory: Path) -> tuple[dict, dict, bool]:
    values = hf.read_config(directory)
    weights = hf.read_weights(directory)
    if values.get("parameterization") == "bd3lm":  # the clip bounds its validation chose
        values.update({key: float(weights[key]) for key in hf.BD3LM_CLIPS if key in weights})
    state = strip_prefix(weights)
    if not state:
        raise CheckpointError(
            f"{directory} holds no 'backbone.*' weights; it is not in the mdlm-owt layout."
        )
    return values, state, False
