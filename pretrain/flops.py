"""Model FLOPs per token and the device's peak, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

# dense bf16 peak of the accelerators this codebase is run on
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A6000": 155e12}


def peak_flops() -> float | None:
    """The current CUDA device's bf16 peak, or None (CPU, unknown device)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(config) -> float:
    """Training FLOPs per token: 6 x the matmul parameters (blocks, adaLN, output layer)
    plus the attention score and value products (forward 4 L h per layer, x3 for training)."""
    h, layers = config.hidden_size, config.n_blocks
    ada = 6 * h * config.cond_dim if config.backbone == "dit" else 0
    matmul_params = layers * (12 * h * h + ada) + h * config.vocab_size
    return 6 * matmul_params + 3 * layers * 4 * config.length * h
