"""The ``mdlm`` command line (also ``python -m pretrain``): one Hydra config, many modes."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import hydra
from omegaconf import DictConfig

from pretrain.resolvers import absolutize_paths, register

register()

# mode -> (module, function, what it needs)
MODES = {
    "train": ("pretrain.train", "run", "the training loop"),
    "ppl_eval": ("pretrain.evaluate", "run", "perplexity evaluation"),
    "sample_eval": ("pretrain.sample", "run", "sampling"),
}


class UsageError(SystemExit):
    """Stops the command with one sentence on stderr and exit status 2."""

    def __init__(self, message: str):
        print(f"mdlm: {message}", file=sys.stderr)
        super().__init__(2)


def check_config(cfg: DictConfig) -> None:
    """Stops early on settings that cannot work, before any data or model is touched."""
    from model import ConfigError, from_run_config

    if cfg.mode not in MODES:
        raise UsageError(f"mode={cfg.mode} is not a mode; use one of {sorted(MODES)}.")
    if cfg.backbone == "hf_dit":
        if not cfg.eval.checkpoint_path:
            raise UsageError("backbone=hf_dit loads a pretrained model: set "
                             "eval.checkpoint_path to its hub id or directory "
                             "(e.g. kuleshov-group/mdlm-owt).")
        return
    try:
        # The vocabulary comes from the tokenizer later; a placeholder checks the rest.
        from_run_config(cfg, vocab_size=2, mask_index=1)
    except ConfigError as err:
        raise UsageError(str(err)) from None


def _user_errors() -> tuple:
    """Errors whose message is the whole story: printed as one line, no traceback."""
    from model import CheckpointError, ConfigError
    from pretrain.data.shards import ShardError
    from pretrain.ds_config import RunConfigError

    return (CheckpointError, ConfigError, ShardError, RunConfigError, FloatingPointError)


def dispatch(cfg: DictConfig):
    absolutize_paths(cfg)
    check_config(cfg)
    module_name, function, what = MODES[cfg.mode]
    if importlib.util.find_spec(module_name) is None:
        raise UsageError(f"mode={cfg.mode} is not available in this version: {what} "
                         f"({module_name}) is not built yet.")
    try:
        return getattr(importlib.import_module(module_name), function)(cfg)
    except _user_errors() as err:
        raise UsageError(str(err)) from None


@hydra.main(config_path="config", config_name="config", version_base=None)
def main(cfg: DictConfig):
    return dispatch(cfg)
