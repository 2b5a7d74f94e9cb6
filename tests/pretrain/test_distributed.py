"""What the launcher's environment decides, with the devices mocked: which GPU a rank binds
to (never two ranks to one silently), the collective timeout, the node count behind the
default batch sizes, and each rank's share of the data-loading workers."""

import os
from datetime import timedelta

import pytest
import torch

from pretrain import distributed as D
from pretrain import resolvers
from pretrain.ds_config import RunConfigError

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
                 "SLURM_GPUS_PER_TASK", "SLURM_GPU_BIND", "SLURM_STEP_NUM_NODES",
                 "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_CPUS_PER_TASK")


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment (restored afterwards, whatever the code sets) and no
    process group yet; returns a setter."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)

    def set_env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, str(value))
    return set_env


@pytest.fixture
def gpus(monkeypatch):
    """Mocks the visible CUDA devices: ``gpus(n)``; set_device calls are recorded."""
    bound = []

    def mock(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", bound.append)
        return bound
    return mock


@pytest.mark.parametrize("local_rank, visible, local_ranks, per_task, index", [
    (0, 1, 1, False, 0),  # one rank, one GPU
    (3, 8, 8, False, 3),  # deepspeed launcher / torchrun on an 8-GPU node
    (5, 1, 8, True, 0),  # srun --gpus-per-task=1: each task sees its own GPU as device 0
    (1, 2, None, False, 1),  # no launcher count: the local rank alone
])
def test_gpu_index_is_the_local_rank_modulo_the_visible_gpus(local_rank, visible, local_ranks,
                                                             per_task, index):
    assert D.gpu_index(local_rank, visible, local_ranks, per_task) == index


@pytest.mark.parametrize("local_rank, visible, local_ranks", [(1, 1, 2), (0, 1, 2), (4, 4, None),
                                                              (0, 4, 8)])
def test_two_ranks_never_share_a_gpu_silently(local_rank, visible, local_ranks):
    with pytest.raises(RunConfigError, match="visible GPU.*--num_gpus.*CUDA_VISIBLE_DEVICES"):
        D.gpu_index(local_rank, visible, local_ranks, per_task_binding=False)


def test_deepspeed_launcher_with_two_ranks_on_one_gpu_is_refused_before_binding(env, gpus,
                                                                                monkeypatch):
    import deepspeed

    bound = gpus(1)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: pytest.fail("initialised"))
    env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_SIZE=2, MASTER_ADDR="127.0.0.1",
        MASTER_PORT=29500)
    with pytest.raises(RunConfigError, match="2 ranks on this node but 1 visible GPU"):
        D.init()
    assert bound == []


def test_srun_gives_each_task_its_own_gpu(env, gpus):
    gpus(1)
    env(SLURM_PROCID=13, SLURM_NTASKS=16, SLURM_LOCALID=5, SLURM_NTASKS_PER_NODE=8,
        SLURM_GPUS_PER_TASK=1, RANK=13, WORLD_SIZE=16, LOCAL_RANK=5)
    assert D.cuda_index() == 0 and D.device() == torch.device("cuda", 0)
    # the deepspeed launcher's ranks share the launcher's GPUs, slurm's binding or not
    env(LOCAL_SIZE=8)
    with pytest.raises(RunConfigError):
        D.cuda_index()


def test_all_gpus_of_a_node_bind_one_rank_each(env, gpus):
    gpus(8)
    env(RANK=11, WORLD_SIZE=16, LOCAL_RANK=3, LOCAL_WORLD_SIZE=8)
    assert D.cuda_index() == 3


def test_a_lone_process_in_a_many_task_allocation_takes_the_first_gpu(env, gpus):
    gpus(1)
    env(SLURM_NTASKS_PER_NODE=8, RANK=0, WORLD_SIZE=1, LOCAL_RANK=0)
    assert D.cuda_index() == 0


def test_ds_accelerator_cpu_keeps_a_run_on_the_cpu_of_a_gpu_machine(env, gpus, monkeypatch):
    """The deepspeed launcher names GPUs for its ranks even on a CPU run."""
    import deepspeed

    gpus(2)
    calls = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(kw))
    monkeypatch.setattr(D, "_unlink_shm_buffer", lambda: None)
    env(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="0,1", RANK=0, WORLD_SIZE=1, LOCAL_RANK=0,
        LOCAL_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500)
    D.init()
    assert calls[0]["dist_backend"] == "gloo" and D.device() == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("minutes, expected", [(None, timedelta(minutes=30)),
                                               (45, timedelta(minutes=45)),
                                               (2.5, timedelta(seconds=150))])
def test_init_passes_the_collective_timeout(env, gpus, monkeypatch, minutes, expected):
    import deepspeed

    gpus(0)
    calls = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(kw))
    monkeypatch.setattr(D, "_unlink_shm_buffer", lambda: None)
    D.init(timeout_minutes=minutes)
    assert calls == [dict(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                          timeout=expected)]


def test_a_non_positive_timeout_is_refused():
    with pytest.raises(RunConfigError, match="trainer.collective_timeout_minutes=0 must be"):
        D.collective_timeout(0)


def test_the_timeout_key_and_the_launcher_counts_are_in_the_config(env):
    from tests.pretrain.test_cli import compose_config

    env(WORLD_SIZE=16, LOCAL_WORLD_SIZE=8)
    cfg = compose_config("loader.global_batch_size=512")
    assert cfg.trainer.collective_timeout_minutes == 30
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.loader.batch_size) == (2, 8, 32)
    assert cfg.loader.eval_batch_size == 32


@pytest.mark.parametrize("values, nodes", [
    ({}, 1),
    ({"WORLD_SIZE": 2, "LOCAL_SIZE": 2}, 1),  # deepspeed launcher, one node
    ({"WORLD_SIZE": 16, "LOCAL_SIZE": 8}, 2),  # deepspeed launcher with a hostfile
    ({"WORLD_SIZE": 24, "LOCAL_WORLD_SIZE": 8}, 3),  # torchrun
    ({"SLURM_STEP_NUM_NODES": 4, "SLURM_NNODES": 8}, 4),  # an srun step within a job
    ({"SLURM_NNODES": 2}, 2),
])
def test_node_count_comes_from_the_launcher(env, values, nodes):
    env(**values)
    assert resolvers.node_count() == nodes


@pytest.mark.parametrize("values, cpus, workers", [
    ({}, 16, 16),
    ({"LOCAL_SIZE": 2}, 2, 1),  # the deepspeed launcher's 2 CPU ranks on 2 cores
    ({"LOCAL_WORLD_SIZE": 8}, 64, 8),  # torchrun on a 64-core node
    ({"LOCAL_SIZE": 8, "SLURM_CPUS_PER_TASK": 64}, 64, 8),  # deepspeed inside one slurm task
    ({"SLURM_NTASKS_PER_NODE": 8, "SLURM_CPUS_PER_TASK": 8}, 8, 8),  # srun binds 8 per task
    ({"SLURM_NTASKS_PER_NODE": 8, "SLURM_CPUS_PER_TASK": 8}, 64, 8),  # srun, no binding
    ({"SLURM_NTASKS_PER_NODE": 8}, 64, 8),
    ({"LOCAL_SIZE": 8}, 4, 1),
])
def test_each_rank_gets_its_share_of_the_cpus(env, monkeypatch, values, cpus, workers):
    monkeypatch.setattr(resolvers, "cpu_count", lambda: cpus)
    env(**values)
    assert resolvers.cpus_per_rank() == workers
