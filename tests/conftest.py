import os

# Tests never reach the network: hub names resolve only from local caches they build.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ... nor Weights & Biases: commands that carry the release's wandb.* keys do not log there
# (the W&B tests set WANDB_MODE=offline themselves).
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests run on the CPU, also on a GPU machine: their exact assertions (bit-for-bit resume,
# ZeRO-3 against ZeRO-2) hold on the CPU only, and their ranks must not share a GPU. Set
# before torch initialises CUDA; every child process (deepspeed, mdlm) inherits it, and
# DS_ACCELERATOR=cpu keeps the deepspeed launcher's ranks off the GPUs it names for them.
# MDLM_TEST_GPU=1 leaves the GPUs visible.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
if os.environ.get("MDLM_TEST_GPU") != "1":
    os.environ.update(CPU_ONLY)

import pytest  # noqa: E402
import torch  # noqa: E402

from model import ModelConfig  # noqa: E402


def tiny_config(**changes) -> ModelConfig:
    """A 2-block model small enough for exhaustive checks on CPU."""
    values = dict(vocab_size=23, mask_index=22, length=12, hidden_size=32, cond_dim=16,
                  n_blocks=2, n_heads=2, dropout=0.0)
    values.update(changes)
    return ModelConfig(**values)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fills every parameter with noise so that zero-initialised layers carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
