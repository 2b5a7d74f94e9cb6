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


def device_count() -> int:
    """Ranks on this node as the launcher set them, else the accelerators on this node (at
    least 1: a CPU run counts as one device)."""
    for var in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    try:
        import torch

        if torch.cuda.is_available():
            return max(torch.cuda.device_count(), 1)
    except ImportError:
        pass
    return 1


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def register() -> None:
    resolvers = {
        "cwd": os.getcwd,
        "device_count": device_count,
        "cpu_count": cpu_count,
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
