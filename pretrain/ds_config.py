"""DeepSpeed configuration: a JSON file of ``ds_configs/`` (by name or path) whose "auto"
fields are filled from the run config, and the precision modes.

``trainer.precision`` names one of four modes (``PRECISIONS``), each a DeepSpeed engine
dtype and a ``model.autocast`` dtype:

- ``bf16`` (the default; also ``bf16-mixed``): the release's numerics. fp32 weights,
  gradients, gradient communication and optimizer; bf16 autocast inside the network.
- ``bf16-deepspeed``: DeepSpeed's bf16 engine. bf16 weights and gradients (half the memory
  for them and half the bytes communicated per step), fp32 master weights in the
  optimizer; the network still runs under bf16 autocast (LayerNorm in float32).
- ``fp16`` (also ``16``, ``16-mixed``): DeepSpeed's fp16 engine with dynamic loss scaling
  and fp16 autocast; CUDA only (DeepSpeed's CPU accelerator has no fp16).
- ``32`` (also ``32-true``): fp32 throughout; on CUDA with TF32 matmuls unless
  ``trainer.tf32=false`` (``tf32_enabled``).

ZeRO-2's buckets (``ds_configs/zero2.json``): ``reduce_bucket_size`` and
``allgather_bucket_size`` are 5e7 elements, 200 MB of fp32 gradients. DeepSpeed's default
(5e8, 2 GB in fp32, about 4.5 times that with ``overlap_comm``) holds a whole small model,
so its one reduction could not overlap the backward pass; 5e7 still moves tens of MB per
collective, enough to saturate NCCL.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from model.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
NAMES = ("zero0", "zero1", "zero2", "zero3", "zero3_offload")
log = logging.getLogger(__name__)
OPTIM_IMPLS = ("auto", "torch", "deepspeed")
# trainer.precision -> (DeepSpeed engine dtype, model.autocast)
PRECISIONS = {
    "bf16": ("fp32", "bf16"), "bf16-mixed": ("fp32", "bf16"),
    "bf16-deepspeed": ("bf16", "bf16"),
    "fp16": ("fp16", "fp16"), "16": ("fp16", "fp16"), "16-mixed": ("fp16", "fp16"),
    "32": ("fp32", "off"), "32-true": ("fp32", "off"),
}


class RunConfigError(UserError):
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


def precision_of(cfg) -> str:
    """``trainer.precision``, checked."""
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise RunConfigError(f"trainer.precision={precision} is not one of bf16, "
                             "bf16-deepspeed, fp16, 32.")
    return precision


def optim_impl(cfg) -> str:
    """``optim.impl`` (``pretrain.optim``), checked with the other settings before a run."""
    impl = str((cfg.get("optim") or {}).get("impl", "auto"))
    if impl not in OPTIM_IMPLS:
        raise RunConfigError(f"optim.impl={impl} is not one of {', '.join(OPTIM_IMPLS)}.")
    return impl


def build(cfg, world: int, device_type: str | None = None) -> dict:
    """The DeepSpeed config dict of this run. ``device_type`` ("cuda" or "cpu") is where it
    will run; None asks ``pretrain.distributed``."""
    optim_impl(cfg)
    micro = int(cfg.loader.batch_size)
    global_batch = int(cfg.loader.global_batch_size)
    accumulation = batch_layout(global_batch, micro, world)
    precision = precision_of(cfg)
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
    wanted = PRECISIONS[precision][0]
    for key in ("fp16", "bf16"):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted == key
    check_precision(cfg, precision, engine_dtype(ds), device_type)
    return single_rank_stage(ds, world)


def loop_clips(ds: dict) -> bool:
    """Whether the training loop clips the gradients itself: under ZeRO-0 with fp32
    weights, where it takes their norm anyway (its NaN check) and DeepSpeed would take it
    again, parameter by parameter. Elsewhere DeepSpeed's optimizer wrappers clip."""
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    return stage == 0 and engine_dtype(ds) == "fp32" and float(
        ds.get("gradient_clipping") or 0.0) > 0


def single_rank_stage(ds: dict, world: int) -> dict:
    """ZeRO-1/2 on one rank partitions nothing; it only adds copies into flat partition
    buffers and a second gradient norm (a third of an optimizer-bound step on the CPU). One
    rank runs them as ZeRO-0, the same arithmetic. Offloading configs keep their stage: there
    the partition lives in CPU memory on purpose."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload = any((zero.get(key) or {}).get("device", "none") not in ("none", None)
                  for key in ("offload_optimizer", "offload_param"))
    if world == 1 and stage in (1, 2) and not offload:
        log.info("one rank: running ZeRO-%d as ZeRO-0 (nothing to partition)", stage)
        ds = {**ds, "zero_optimization": {"stage": 0}}
    return ds


def engine_dtype(ds: dict) -> str:
    """The dtype of DeepSpeed's weights and gradients under ``ds``: fp16, bf16 or fp32."""
    for key in ("fp16", "bf16"):
        if ds.get(key, {}).get("enabled") is True:
            return key
    return "fp32"


def check_precision(cfg, precision: str, engine: str, device_type: str | None) -> None:
    """The engine dtype, ``model.autocast`` and the device agree: low-precision weights
    need the network to compute in their dtype, fp16 activations need the loss scaling of
    DeepSpeed's fp16 engine, which runs on CUDA only."""
    wanted, default_autocast = PRECISIONS[precision]
    if engine != wanted:
        raise RunConfigError(
            f"the DeepSpeed config enables {engine} weights but trainer.precision={precision} "
            f"asks for {wanted}; set its \"fp16\"/\"bf16\" \"enabled\" to \"auto\".")
    autocast = str((cfg.get("model") or {}).get("autocast", "auto") or "auto")
    if engine != "fp32" and autocast not in ("auto", engine):
        raise RunConfigError(
            f"model.autocast={autocast} cannot run the {engine} weights of "
            f"trainer.precision={precision}; leave model.autocast=auto.")
    if engine == "fp32" and autocast == "fp16":
        raise RunConfigError(
            "model.autocast=fp16 needs the loss scaling of DeepSpeed's fp16 engine; use "
            "trainer.precision=fp16 on a GPU, or model.autocast=bf16.")
    if engine == "fp16" and _device_type(device_type) != "cuda":
        raise RunConfigError(
            f"trainer.precision={precision} needs a CUDA GPU (DeepSpeed has no loss-scaled "
            "fp16 on the CPU); use trainer.precision=bf16.")


def _device_type(device_type: str | None) -> str:
    if device_type is not None:
        return device_type
    from pretrain import distributed as D

    return "cuda" if D.cuda_enabled() else "cpu"


def model_autocast(precision: str) -> str:
    """The network's autocast dtype under ``trainer.precision`` (see the module's
    docstring): bf16 for both bf16 modes, fp16 for fp16, off for fp32."""
    return PRECISIONS.get(precision, ("fp32", "off"))[1]


def tf32_enabled(cfg, device_type: str) -> bool:
    """Whether fp32 matmuls run as TF32 (``trainer.tf32``): ``auto`` turns them on for
    ``trainer.precision=32`` on CUDA, where the 10-bit mantissa of the inputs costs less
    than the bf16 modes already accept; the bf16 modes keep the release's exact fp32
    parts. On the CPU it does nothing."""
    setting = str(cfg.trainer.get("tf32", "auto")).lower()
    if setting not in ("auto", "true", "false"):
        raise RunConfigError(f"trainer.tf32={setting} is not one of auto, true, false.")
    if device_type != "cuda":
        return False
    if setting == "auto":
        return PRECISIONS[precision_of(cfg)] == ("fp32", "off")
    return setting == "true"


def apply_tf32(cfg, device_type: str) -> bool:
    """Sets torch's TF32 switches from ``tf32_enabled`` on CUDA, with a log line."""
    if device_type != "cuda":
        return False
    on = tf32_enabled(cfg, device_type)
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    log.info("TF32 matmuls %s (trainer.tf32=%s, trainer.precision=%s)", "on" if on else "off",
             cfg.trainer.get("tf32", "auto"), cfg.trainer.precision)
    return on


def compile_after_init(ds: dict, compile_blocks: bool) -> bool:
    """Whether ``model.compile`` must wait until ``deepspeed.initialize``: ZeRO-3 replaces
    the parameters by partitions and hooks every module, so blocks compiled before would
    trace the unpartitioned ones."""
    return bool(compile_blocks) and int(ds.get("zero_optimization", {}).get("stage", 0)) == 3


