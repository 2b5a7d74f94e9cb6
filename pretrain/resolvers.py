"""OmegaConf resolvers used by the run config (the names the MDLM release's configs use)."""

from __future__ import annotations

import ast
import operator
import os

from omegaconf import OmegaConf

_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


def arithmetic(expression) -> float | int:
    """Evaluates an arithmetic expression of numbers (the release's ``${eval:...}``)."""
    if not isinstance(expression, str):
        return expression

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.operand))
        raise ValueError(
            f"${{eval:{expression}}} is not plain arithmetic; only numbers and + - * / // % ** "
            "are allowed in config expressions."
        )

    value = walk(ast.parse(expression, mode="eval"))
    return int(value) if isinstance(value, float) and value.is_integer() else value


# ranks on this node: the deepspeed launcher, torchrun, slurm
LOCAL_RANKS_VARS = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
# ranks started together by one launcher process on this node (sharing its CPUs)
FORKED_LOCAL_RANKS_VARS = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE")


def _env_int(*names: str) -> int | None:
    """The first of ``names`` set to a positive integer in the environment."""
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def launcher_local_ranks() -> int | None:
    """Ranks on this node as the launcher announced them, or None (no launcher)."""
    return _env_int(*LOCAL_RANKS_VARS)


def device_count() -> int:
    """Ranks on this node as the launcher set them, else the accelerators on this node (at
    least 1: a CPU run counts as one device)."""
    local = launcher_local_ranks()
    if local is not None:
        return local
    try:
        import torch

        if torch.cuda.is_available():
            return max(torch.cuda.device_count(), 1)
    except ImportError:
        pass
    return 1


def node_count() -> int:
    """Nodes of the run as the launcher set them: world size / ranks per node under the
    deepspeed launcher or torchrun, the step's (or job's) nodes under srun, else 1. It
    enters the default per-device batch sizes (trainer.num_nodes)."""
    world, local = _env_int("WORLD_SIZE"), _env_int(*FORKED_LOCAL_RANKS_VARS)
    if world is not None and local is not None:
        return max(1, -(-world // local))
    return _env_int("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") or 1


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpus_per_rank() -> int:
    """This rank's share of the node's CPUs (loader.num_workers), at least 1. The deepspeed
    launcher and torchrun start every local rank with the same CPUs: they are divided
    among them. Under srun a task's CPUs are slurm's --cpus-per-task."""
    cpus = cpu_count()
    forked = _env_int(*FORKED_LOCAL_RANKS_VARS)
    if forked is not None:
        return max(1, cpus // forked)
    per_task = _env_int("SLURM_CPUS_PER_TASK")
    if per_task is not None:
        return max(1, min(cpus, per_task))
    return max(1, cpus // (launcher_local_ranks() or 1))


def register() -> None:
    resolvers = {
        "cwd": os.getcwd,
        "device_count": device_count,
        "cpu_count": cpu_count,
        "cpus_per_rank": cpus_per_rank,
        "node_count": node_count,
        "eval": arithmetic,
        "div_up": lambda x, y: (int(x) + int(y) - 1) // int(y),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def absolutize_paths(cfg) -> None:
    """Hydra runs the job inside its run directory: relative paths the user typed are made
    relative to where the command was started (names of hub datasets stay as they are)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    if not HydraConfig.initialized():
        return
    base = HydraConfig.get().runtime.cwd

    def fix(node, key: str, must_exist: bool) -> None:
        value = node.get(key)
        if not isinstance(value, str) or not value:
            return
        expanded = os.path.expanduser(value)
        if os.path.isabs(expanded):
            return
        candidate = os.path.join(base, expanded)
        if not must_exist or os.path.exists(candidate):
            node[key] = candidate

    with open_dict(cfg):
        for key in ("train", "valid", "tokenizer_name_or_path"):
            fix(cfg.data, key, must_exist=True)
        fix(cfg.data, "cache_dir", must_exist=False)
        fix(cfg.eval, "checkpoint_path", must_exist=True)
        if not OmegaConf.is_interpolation(cfg.checkpointing, "save_dir"):
            fix(cfg.checkpointing, "save_dir", must_exist=False)
