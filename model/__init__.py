"""Model core: backbones, noise schedules, objectives and checkpoint interop.

Imports none of the project's other packages. Its names load on first use, so that
``model.errors`` (which torch-free tools such as ``pretrain.data.prepare`` raise) does not
import torch.
"""

import importlib

_EXPORTS = {
    "load_pretrained": "model.checkpoint",
    "save_pretrained": "model.checkpoint",
    "ModelConfig": "model.config",
    "from_run_config": "model.config",
    "Diffusion": "model.diffusion",
    "Loss": "model.diffusion",
    "build_backbone": "model.diffusion",
    "compile_backbone": "model.diffusion",
    "CheckpointError": "model.errors",
    "ConfigError": "model.errors",
    "UserError": "model.errors",
    "get_noise": "model.noise",
    "mask_and_vocab": "model.vocab",
    "tokenizer_ids": "model.vocab",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
