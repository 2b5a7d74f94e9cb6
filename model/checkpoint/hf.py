"""The Hugging Face layout of the released MDLM (``kuleshov-group/mdlm-owt``).

A directory with ``config.json`` (``model_type: "mdlm"``, ``vocab_size``, ``model_length``,
``hidden_dim``, ``cond_dim``, ``n_blocks``, ``n_heads``, ``dropout``, ``time_conditioning``)
and weights in ``model.safetensors`` (possibly sharded) or ``pytorch_model.bin``, keys
prefixed ``backbone.``. Settings this project adds (backbone, parameterization, mask index,
T, noise) are extra top-level fields that other readers ignore.

``save_pretrained`` also copies the configuration and modeling code of ``remote/`` beside the
weights and names them in ``auto_map``, so that ``transformers`` opens the directory alone
(``AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from model.checkpoint.keys import PREFIX
from model.errors import CheckpointError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

# config.json name -> ModelConfig field
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "model_length": "length",
    "hidden_dim": "hidden_size",
    "cond_dim": "cond_dim",
    "n_blocks": "n_blocks",
    "n_heads": "n_heads",
    "dropout": "dropout",
    "time_conditioning": "time_conditioning",
}
# a BD3-LM release config.json: settings that must have these values, and the clip bounds
# of its noise schedule (also stored as top-level tensors in its weights, which win)
BD3LM_FIXED = {"cross_attn": True, "adaln": True, "causal": False}
BD3LM_CLIPS = ("sampling_eps_min", "sampling_eps_max")
# the code transformers imports for trust_remote_code=True, copied beside the weights
REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_mdlm.py", "modeling_mdlm.py")
EXTRA_FIELDS = ("backbone", "parameterization", "mask_index", "T", "subs_masking", "noise",
                "bos_index", "eos_index", "block_size", "ignore_bos", "sampling_eps_min",
                "sampling_eps_max")


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_config(directory: Path) -> dict:
    """ModelConfig values from an HF-layout config.json: MDLM's (``model_type: "mdlm"``) or
    the BD3-LM release's (``"bd3lm"``, kuleshov-group/bd3lm-owt-block_size*: its
    ``block_size`` and clip bounds; the x_t/x_0 cross-attention DiT with adaLN, trained
    with the first token clean)."""
    with open(directory / CONFIG_NAME) as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type not in ("mdlm", "bd3lm"):
        raise CheckpointError(
            f"{directory / CONFIG_NAME} has model_type={model_type!r}, not 'mdlm' or 'bd3lm'; "
            "point load_pretrained at an MDLM or BD3-LM checkpoint (the "
            "kuleshov-group/mdlm-owt or bd3lm-owt-block_size* layout)."
        )
    values = {field: raw[key] for key, field in HF_FIELDS.items() if key in raw}
    if model_type == "bd3lm":
        unsupported = {key: raw[key] for key, want in BD3LM_FIXED.items()
                       if key in raw and raw[key] != want}
        if unsupported:
            raise CheckpointError(
                f"{directory / CONFIG_NAME} describes a BD3-LM with {unsupported}; only the "
                f"release's architecture ({BD3LM_FIXED}) loads here.")
        values.update(parameterization="bd3lm", ignore_bos=True,
                      block_size=int(raw.get("block_size", 1)))
    values.update({key: raw[key] for key in EXTRA_FIELDS if key in raw})
    if "mask_index" not in values and "vocab_size" in values:
        # The release's GPT-2 model: the mask token is the last entry of the vocabulary.
        values["mask_index"] = values["vocab_size"] - 1
    return values


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(directory: Path) -> dict:
    """All tensors of an HF-layout directory (single file or sharded with an index)."""
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        if (directory / index_name).is_file():
            with open(directory / index_name) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_load_file(directory / shard))
            return state
    for name in (SAFETENSORS_NAME, TORCH_NAME):
        if (directory / name).is_file():
            return _load_file(directory / name)
    raise CheckpointError(
        f"{directory} has a config.json but no weights ({SAFETENSORS_NAME} or {TORCH_NAME}); "
        "the download or export is incomplete: fetch or export it again."
    )


def auto_map(config) -> dict:
    """The transformers Auto classes the copied remote code provides for ``config``."""
    out = {"AutoConfig": "configuration_mdlm.MDLMConfig",
           "AutoModelForMaskedLM": "modeling_mdlm.MDLM"}
    if config.backbone == "ar":
        out["AutoModelForCausalLM"] = "modeling_mdlm.MDLM"
    return out


def config_json(config) -> dict:
    out = {"model_type": "mdlm", "architectures": ["MDLM"], "return_dict": False,
           "torch_dtype": "float32", "auto_map": auto_map(config)}
    out.update({key: getattr(config, field) for key, field in HF_FIELDS.items()})
    out.update({key: getattr(config, key) for key in EXTRA_FIELDS})
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(model, directory) -> Path:
    """Writes ``model`` (a Diffusion) in the mdlm-owt layout: config.json + model.safetensors
    + the configuration and modeling code ``trust_remote_code=True`` imports.

    The weights and code are written first and config.json last, each atomically, so a
    directory with a config.json is never half-written.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {PREFIX + k: v.detach().to("cpu").contiguous().clone()
             for k, v in model.backbone.state_dict().items()}
    _atomic_write(directory / SAFETENSORS_NAME,
                  lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    for name in REMOTE_FILES:
        _atomic_write(directory / name,
                      lambda tmp, name=name: shutil.copyfile(REMOTE_DIR / name, tmp))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config_json(model.config), f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(directory / CONFIG_NAME, write_config)
    return directory


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetches (or finds in the local cache) an HF hub repository's config and weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.bin"],
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}); "
            "check the name, your network or HF_HUB_OFFLINE, or pass a local directory."
        ) from err
    return Path(path)
