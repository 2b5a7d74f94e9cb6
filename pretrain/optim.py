"""The optimizer: AdamW (decoupled weight decay) from ``optim.*``, DeepSpeed's by default.

``optim.impl=auto`` (or ``deepspeed``) picks the implementation by where the optimizer's
parameters live: on the CPU (CPU runs, and ZeRO-Offload's ``offload_optimizer``)
DeepSpeed's vectorized ``DeepSpeedCPUAdam``, about seven times faster per step than
torch's AdamW (``benchmarks/bench_optim.py``); on CUDA ``FusedAdam`` (multi-tensor
kernels). Both compute the same update as ``torch.optim.AdamW``; ``optim.impl=torch`` keeps
torch's AdamW, for comparisons.

DeepSpeed compiles these ops on first use (about a minute) and caches them under
``~/.cache/torch_extensions`` (or ``$TORCH_EXTENSIONS_DIR``); a run that has to compile one
says so once. A build killed mid-way leaves a lock that would hang every later run: see
``settle_build_locks``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from pathlib import Path

import torch

from pretrain import distributed as D
from pretrain.ds_config import RunConfigError, optim_impl

log = logging.getLogger(__name__)


# what a failed op build raises: the compiler's exit (RuntimeError, CalledProcessError), a
# missing toolkit or header (OSError, ImportError), a setting the builder cannot parse
BUILD_ERRORS = (RuntimeError, ValueError, OSError, ImportError, subprocess.CalledProcessError)


def impl_of(cfg) -> str:
    """``optim.impl``, checked (``ds_config.optim_impl``)."""
    return optim_impl(cfg)


def on_cpu(ds_cfg: dict) -> bool:
    """Whether the optimizer steps on the CPU: no CUDA, or ZeRO-Offload of the optimizer."""
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return not D.cuda_enabled() or offload.get("device", "none") in ("cpu", "nvme")


def hyperparameters(cfg) -> dict:
    return {"lr": cfg.optim.lr, "betas": (cfg.optim.beta1, cfg.optim.beta2),
            "eps": cfg.optim.eps, "weight_decay": cfg.optim.weight_decay}


def build(module: torch.nn.Module, cfg, ds_cfg: dict) -> torch.optim.Optimizer:
    """The optimizer of ``module``'s parameters, before ``deepspeed.initialize`` wraps it.
    Under ``optim.impl=auto`` an op that cannot be compiled here (no C++ compiler or CUDA
    toolkit) falls back to torch's AdamW with a warning; ``deepspeed`` stops instead."""
    impl = impl_of(cfg)
    if impl == "torch":
        return torch.optim.AdamW(module.parameters(), **hyperparameters(cfg))
    try:
        return deepspeed_adamw(module.parameters(), hyperparameters(cfg), on_cpu(ds_cfg))
    except BUILD_ERRORS as error:
        if impl == "deepspeed":
            raise RunConfigError(
                f"optim.impl=deepspeed: DeepSpeed's Adam op did not compile ({error}); install "
                "a C++ compiler and ninja (and the CUDA toolkit on GPUs), or set "
                "optim.impl=torch.") from error
        log.warning("DeepSpeed's Adam op did not compile (%s); using torch's AdamW", error,
                    exc_info=True)
        return torch.optim.AdamW(module.parameters(), **hyperparameters(cfg))


def deepspeed_adamw(params, hyper: dict, cpu: bool) -> torch.optim.Optimizer:
    """``DeepSpeedCPUAdam`` (``cpu``) or ``FusedAdam``, both in AdamW mode."""
    if cpu:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        announce_build(CPUAdamBuilder())
        return cpu_adam(params, **hyper)
    from deepspeed.ops.adam import FusedAdam
    from deepspeed.ops.op_builder import FusedAdamBuilder

    announce_build(FusedAdamBuilder())
    with arch_list_deepspeed_reads():
        return FusedAdam(params, adam_w_mode=True, **hyper)


def deepspeed_arch_list(value: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` in the form DeepSpeed's JIT builder parses: torch accepts
    architecture-specific targets such as ``9.0a`` (CUDA images set them), on which the
    builder fails (``int('0a')``). Each becomes its base architecture (``9.0a`` -> ``9.0``,
    ``+PTX`` kept). "" (unset: the builder then compiles for the GPUs it sees) when any
    entry is not of that form (``Hopper``, ``All``), rather than build for fewer."""
    kept = []
    for entry in filter(None, value.replace(" ", ";").split(";")):
        match = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", entry.strip())
        if match is None:
            return ""
        arch = f"{match[1]}.{match[2]}{match[3] or ''}"
        if arch not in kept:
            kept.append(arch)
    return ";".join(kept)


@contextlib.contextmanager
def arch_list_deepspeed_reads():
    """``TORCH_CUDA_ARCH_LIST`` as ``deepspeed_arch_list`` rewrites it while DeepSpeed
    builds an op; restored afterwards."""
    name = "TORCH_CUDA_ARCH_LIST"
    value = os.environ.get(name)
    if value is None or deepspeed_arch_list(value) == value:
        yield
        return
    fixed = deepspeed_arch_list(value)
    log.info("%s=%s: DeepSpeed's build reads it as %r", name, value, fixed or "(unset)")
    if fixed:
        os.environ[name] = fixed
    else:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ[name] = value


def is_built(builder) -> bool:
    """Whether DeepSpeed's op is installed precompiled or already in the extension cache."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get(builder.name, False):
        return True
    directory = _get_build_directory(builder.name, verbose=False)
    return any(Path(directory).glob("*.so"))


BUILD_LOCK_STALE_SECONDS = 600.0  # an op builds in about a minute


def build_lock_files() -> list[Path]:
    """The ``lock`` files of torch's extension builds (DeepSpeed's ops) under
    ``$TORCH_EXTENSIONS_DIR``, or ``~/.cache/torch_extensions/<python>_<accelerator>``."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return sorted(Path(root).glob("*/lock"))
    return sorted(Path(get_default_build_root()).glob("*/*/lock"))


def settle_build_locks(stale_after: float = BUILD_LOCK_STALE_SECONDS,
                       poll: float = 1.0) -> list[Path]:
    """Waits for, or removes, the locks of op builds before DeepSpeed loads its ops; returns
    the locks it removed.

    torch's extension loader holds a ``lock`` file in the op's build directory while it
    compiles, and every other process waits for the file to go, with no time limit. A
    build killed mid-way (a preempted or timed-out job, Ctrl-C) leaves the file behind, and
    every later run would hang at start-up. A lock younger than ``stale_after`` seconds is
    another process's build: waited for, said once. One that old is left over: removed,
    with a warning, and the op is built again."""
    removed = []
    for lock in build_lock_files():
        said = False
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break  # that build finished
            if age >= stale_after:
                lock.unlink(missing_ok=True)
                log.warning("removed %s, left %.0f minutes ago by a build of DeepSpeed's %s "
                            "op that did not finish; the op is built again", lock, age / 60,
                            lock.parent.name)
                removed.append(lock)
                break
            if not said:
                log.info("waiting for another process's build of DeepSpeed's %s op (%s; a "
                         "lock older than %.0f minutes is removed)", lock.parent.name, lock,
                         stale_after / 60)
                said = True
            time.sleep(poll)
    return removed


def announce_build(builder) -> None:
    """One line on rank 0 when the op is compiled now: the run is not stuck."""
    if D.rank() == 0 and not is_built(builder):
        log.info("compiling DeepSpeed's %s op (once, about a minute; cached under "
                 "~/.cache/torch_extensions)", builder.name)


def cpu_adam(params, **hyper) -> torch.optim.Optimizer:
    """``DeepSpeedCPUAdam`` in AdamW mode whose steps after a resume are bit-identical to an
    uninterrupted run's (``follow_steps``)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, **hyper)
    follow_steps(optimizer)
    return optimizer


def follow_steps(optimizer) -> None:
    """DeepSpeedCPUAdam's C++ side keeps ``beta ** step`` as a running product while steps
    come one by one, and recomputes it with ``pow`` when the step jumps (a resumed run's
    first step); the two differ in the last bit. Before a step whose count the C++ side has
    not followed, the product is replayed from step 1 on one-element scratch tensors. (Step
    hooks rather than a subclass: ZeRO accepts only DeepSpeed's own optimizer types.)"""
    followed = [0]

    def before(opt, args, kwargs):
        done = _steps_done(opt)
        if done != followed[0]:
            _replay(opt, done)

    def after(opt, args, kwargs):
        followed[0] = _steps_done(opt)

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)


def _steps_done(optimizer) -> int:
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                return int(state["step"])
    return 0


def _replay(optimizer, steps: int) -> None:
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    scratch = [torch.zeros(1) for _ in range(4)]
    for k in range(1, steps + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, k, 0.0, beta1, beta2, 1e-8, 0.0,
                                          True, *scratch)
