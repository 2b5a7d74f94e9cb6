"""Process-group setup and the few collectives the loop needs.

Under the ``deepspeed`` launcher (or torchrun, or srun with the variables mapped) the rank
variables are in the environment. A plain single-process run gets them set here (rank 0 of
1, a free local port), so ``deepspeed.init_distributed`` never falls into MPI discovery.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> None:
    if dist.is_initialized():
        return
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
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    if not torch.cuda.is_available():
        _unlink_shm_buffer()


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
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(value: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


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
