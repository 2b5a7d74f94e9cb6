"""This project's training checkpoints (``<save_dir>/checkpoints/<tag>/``), read without a
process group at any ZeRO stage.

``run.json`` holds the model config; ``rank_NNNNN.pt`` files the EMA (every rank's
partition under ZeRO-3, rank 0's whole average otherwise); the raw weights are DeepSpeed's
model states (``mp_rank_00_model_states.pt``) or, under ZeRO-3, its partitioned fp32 states
consolidated by DeepSpeed's own ``zero_to_fp32`` reader.

Every file is read strictly through the ``OURS`` allowlist of ``model.checkpoint.safe``
(``zero_to_fp32`` too, by ``safe.restricted_torch_load``); ``trust=True`` reads them fully.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.checkpoint import safe
from model.errors import CheckpointError

RUN_FILE = "run.json"
LATEST = "latest"
MODULE_PREFIX = "model."  # the training wrapper's attribute holding the Diffusion


def locate(path: Path) -> Path | None:
    """The checkpoint (tag) directory that ``path`` names: a tag directory, a checkpoints
    directory with ``latest``, or a run directory; None when it is none of these."""
    path = Path(path)
    if (path / RUN_FILE).is_file():
        return path
    for checkpoints in (path, path / "checkpoints"):
        latest = checkpoints / LATEST
        if latest.is_file():
            tag_dir = checkpoints / latest.read_text().strip()
            if (tag_dir / RUN_FILE).is_file():
                return tag_dir
    return None


def consolidate_ema(rank_states: list[dict]) -> dict:
    """Full EMA tensors {parameter name: tensor} from saved EMA states (under ZeRO-3 each
    rank's partition is the flat slice [rank * size, (rank + 1) * size) of the padded
    parameter)."""
    first = rank_states[0]
    if not first["partitioned"]:
        return dict(zip(first["names"], first["shadow"]))
    out = {}
    for i, (name, shape) in enumerate(zip(first["names"], first["shapes"])):
        flat = torch.cat([r["shadow"][i].reshape(-1) for r in rank_states])
        out[name] = flat[: torch.Size(shape).numel()].view(shape)
    return out


def _strip(state: dict) -> dict:
    return {k[len(MODULE_PREFIX):]: v for k, v in state.items() if k.startswith(MODULE_PREFIX)}


def read(tag_dir: Path, use_ema: bool, trust: bool = False) -> tuple[dict, dict, bool]:
    """(config values, state with ``backbone.*`` keys, whether EMA weights were used)."""
    run = json.loads((tag_dir / RUN_FILE).read_text())
    values = dict(run["model_config"])
    if use_ema:
        states = [safe.load(f, safe.OURS, trust=trust) for f in sorted(tag_dir.glob("rank_*.pt"))]
        emas = [s["ema"] for s in states if "ema" in s]
        if emas:
            if emas[0]["partitioned"] and len(emas) != run["world_size"]:
                raise CheckpointError(f"{tag_dir} should hold {run['world_size']} EMA "
                                      f"partitions but has {len(emas)}; copy it completely.")
            return values, _strip(consolidate_ema(emas)), True
    if run["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe.restricted_torch_load(safe.OURS, trust):
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent),
                                                             tag=tag_dir.name)
    else:
        states = safe.load(tag_dir / "mp_rank_00_model_states.pt", safe.OURS, trust=trust)
        state = states["module"]
    return values, _strip({k: v.float() for k, v in state.items()}), False
