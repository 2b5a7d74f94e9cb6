"""Process-group setup and the few collectives the loop needs.

Under the ``deepspeed`` launcher (or torchrun, or srun with the variables mapped) the rank
variables are in the environment. A plain single-process run gets them set here (rank 0 of
1, a free local port), so ``deepspeed.init_distributed`` never falls into MPI discovery.

A run uses CUDA when a GPU is visible and ``DS_ACCELERATOR`` (DeepSpeed's switch, which its
launcher hands to every rank) does not name another accelerator. The launcher sets
``CUDA_VISIBLE_DEVICES`` for its ranks even when it runs them on the CPU, so
``DS_ACCELERATOR=cpu`` is what keeps a CPU run (the tests, a CPU quickstart) on the CPU of a
GPU machine.

Each rank binds to the visible GPU ``LOCAL_RANK % visible GPUs``: all of a node's GPUs under
the deepspeed launcher or torchrun, the task's own GPU under ``srun --gpus-per-task=1``.
Two ranks are never bound to one GPU silently: more ranks than visible GPUs on a node stops
with one sentence, unless slurm binds GPUs per task.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from pretrain.resolvers import FORKED_LOCAL_RANKS_VARS, launcher_local_ranks

# collectives wait this long (trainer.collective_timeout_minutes) before the run fails:
# DeepSpeed's own default, 10 minutes, is shorter than rank 0 scoring generative perplexity
# or building shards while the other ranks wait
DEFAULT_TIMEOUT_MINUTES = 30.0
# set by srun when each task is given its own GPUs (--gpus-per-task, --gpu-bind)
SLURM_PER_TASK_GPU_VARS = ("SLURM_GPUS_PER_TASK", "SLURM_GPU_BIND")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_minutes: float | None = None, dead_rank_minutes: float | None = None) -> None:
    """Joins (or creates) the process group; collectives time out after ``timeout_minutes``
    (trainer.collective_timeout_minutes; 30 when None). Every rank of a multi-rank run then
    joins the watchdog that ends the job when a rank dies (``pretrain.watchdog``; silence
    for ``dead_rank_minutes``, trainer.dead_rank_timeout_minutes, counts as death)."""
    from pretrain import watchdog

    if dist.is_initialized():
        return
    watchdog.check_minutes(dead_rank_minutes)
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        # srun with one task per rank: map slurm's variables (MASTER_ADDR/PORT come from
        # the job script)
        os.environ.update(RANK=os.environ["SLURM_PROCID"],
                          WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    os.environ.setdefault("LOCAL_RANK", "0")
    if not cuda_enabled():
        # a CPU run hides the GPUs the launcher named, before anything initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from pretrain.optim import settle_build_locks

    settle_build_locks()  # a killed build's lock would hang DeepSpeed's op loading
    import deepspeed

    on_cuda = cuda_enabled()
    if on_cuda:
        torch.cuda.set_device(cuda_index())
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo",
                               auto_mpi_discovery=False, verbose=False,
                               timeout=collective_timeout(timeout_minutes))
    if not on_cuda:
        _unlink_shm_buffer()
    watchdog.start(rank(), world_size(), dead_rank_minutes, share=broadcast)


def cuda_enabled() -> bool:
    """Whether this process computes on CUDA (see the module's docstring)."""
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        return False
    return torch.cuda.is_available()


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce creates one shared-memory buffer per rank in /dev/shm
    (about 70 MB) and never removes it, so every run would leave its buffers behind until
    /dev/shm fills the machine's memory. Each rank maps every buffer while the process group
    starts; after a barrier each rank unlinks its own name, and the memory is freed when
    the processes exit, however they exit."""
    if world_size() > 1:
        dist.barrier()
    path = os.path.join("/dev/shm", "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), rank()))
    try:
        os.unlink(path)
    except OSError:
        pass  # no buffer (GPU, several nodes) or already gone


def collective_timeout(minutes: float | None) -> timedelta:
    """The process group's timeout; a non-positive value is refused."""
    from pretrain.ds_config import RunConfigError

    minutes = DEFAULT_TIMEOUT_MINUTES if minutes is None else float(minutes)
    if not minutes > 0:
        raise RunConfigError(f"trainer.collective_timeout_minutes={minutes:g} must be positive; "
                             f"set it to the longest wait of one rank on the others (default "
                             f"{DEFAULT_TIMEOUT_MINUTES:g}).")
    return timedelta(minutes=minutes)


def gpu_index(local_rank: int, visible: int, local_ranks: int | None,
              per_task_binding: bool) -> int:
    """The visible GPU of a rank: ``local_rank % visible``. With fewer visible GPUs than
    ranks on the node two ranks would share a GPU (NCCL then fails at its first collective,
    or the run crawls): refused, unless slurm gives each task its own GPUs."""
    from pretrain.ds_config import RunConfigError

    ranks = max(local_ranks or 1, local_rank + 1)
    if ranks > visible and not per_task_binding:
        raise RunConfigError(
            f"{ranks} ranks on this node but {visible} visible GPU(s): start one rank per GPU "
            f"(deepspeed --num_gpus {visible}, srun --ntasks-per-node={visible}), give each "
            "slurm task its own GPU (srun --gpus-per-task=1), or choose the GPUs with "
            "CUDA_VISIBLE_DEVICES.")
    return local_rank % visible


def cuda_index() -> int:
    """This rank's CUDA device index (see ``gpu_index``). Ranks forked by one launcher
    process (deepspeed, torchrun) share its visible GPUs; srun tasks may each have their own."""
    forked = any(os.environ.get(var) for var in FORKED_LOCAL_RANKS_VARS)
    per_task = not forked and any(os.environ.get(var) for var in SLURM_PER_TASK_GPU_VARS)
    local = launcher_local_ranks()  # slurm's tasks per node, even for a lone process
    local = None if local is None else min(local, expected_world_size())
    return gpu_index(local_rank(), torch.cuda.device_count(), local, per_task)


def expected_world_size() -> int:
    """The world size the launcher announced, known before the process group exists."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device() -> torch.device:
    return torch.device("cuda", cuda_index()) if cuda_enabled() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


def broadcast(value):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(items: list) -> list:
    """Every rank's list (picklable items), concatenated in rank order, on every rank."""
    if world_size() == 1:
        return items
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is set on any rank (every rank gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device())
    return bool(all_reduce(t, dist.ReduceOp.MAX).item() > 0)
