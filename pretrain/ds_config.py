"""DeepSpeed configuration: a JSON file of ``ds_configs/`` (by name or path) whose "auto"
fields are filled from the run config."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
NAMES = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")


class RunConfigError(ValueError):
    """A run setting that cannot work; the message names it and the fix."""


def load(name_or_path: str) -> dict:
    path = Path(str(name_or_path)).expanduser()
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise RunConfigError(f"trainer.deepspeed_config={name_or_path!r} is neither a file nor "
                             f"one of {list(NAMES)}.")
    with open(path) as f:
        return json.load(f)


def batch_layout(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient accumulation steps so that global = micro x accumulation x world."""
    if global_batch % (micro_batch * world):
        raise RunConfigError(
            f"loader.global_batch_size={global_batch} is not a multiple of loader.batch_size="
            f"{micro_batch} x {world} ranks; choose sizes with global = micro batch x "
            "accumulation x world size."
        )
    return global_batch // (micro_batch * world)


def _fill(node, values: dict):
    if isinstance(node, dict):
        return {k: (values[k] if v == "auto" and k in values else _fill(v, values))
                for k, v in node.items()}
    return node


def _autos(node, path="", exclude=()) -> list[str]:
    if isinstance(node, dict):
        return [a for k, v in node.items() if k not in exclude
                for a in _autos(v, f"{path}{k}.", exclude)]
    return [path.rstrip(".")] if node == "auto" else []


def build(cfg, world: int) -> dict:
    """The DeepSpeed config dict of this run."""
    micro = int(cfg.loader.batch_size)
    global_batch = int(cfg.loader.global_batch_size)
    accumulation = batch_layout(global_batch, micro, world)
    precision = str(cfg.trainer.precision)
    if precision not in ("bf16", "fp16", "32", "16", "bf16-mixed", "16-mixed", "32-true"):
        raise RunConfigError(f"trainer.precision={precision} is not one of bf16, fp16, 32.")
    ds = load(cfg.trainer.get("deepspeed_config", "zero2"))
    values = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(cfg.trainer.gradient_clip_val or 0.0),
    }
    ds = _fill(ds, values)
    leftover = _autos(ds, exclude=("fp16", "bf16"))
    if leftover:
        raise RunConfigError(f"the DeepSpeed config leaves {', '.join(leftover)} as \"auto\", "
                             "which this codebase does not fill; give them values.")
    fp16 = precision in ("fp16", "16", "16-mixed")
    for key in ("fp16", "bf16"):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = fp16 if key == "fp16" else False
    return ds


def model_autocast(precision: str) -> str:
    """bf16 runs as the release's bf16-mixed: fp32 weights, bf16 autocast in the network."""
    return "bf16" if precision in ("bf16", "bf16-mixed") else "off"
