"""Model core: backbones, noise schedules, objectives and checkpoint interop.

Imports none of the project's other packages.
"""

from model.checkpoint import load_pretrained, save_pretrained
from model.config import ModelConfig, from_run_config
from model.diffusion import Diffusion, Loss, build_backbone, compile_backbone
from model.errors import CheckpointError, ConfigError, UserError
from model.noise import get_noise
from model.vocab import mask_and_vocab, tokenizer_ids

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Diffusion",
    "Loss",
    "ModelConfig",
    "build_backbone",
    "compile_backbone",
    "from_run_config",
    "get_noise",
    "load_pretrained",
    "mask_and_vocab",
    "save_pretrained",
    "tokenizer_ids",
    "UserError",
]
