"""Model FLOPs per token and the device's peak, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

# Dense bf16 peak (no sparsity) by device name, most specific first: the first entry whose
# words all appear in the name wins. The H100's form factors differ by a quarter.
PEAK_BF16_FLOPS = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM (HBM3); names read "H100 80GB HBM3" or "H100 SXM5 80GB"
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("H800", "PCIe"), 756e12),
    (("H800",), 989e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("A6000",), 155e12),
)


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak of a device called ``name`` (as CUDA reports it), or None when
    the name is not in the table: then MFU is not logged rather than logged wrong."""
    words = name.replace("-", " ").split()
    for keys, peak in PEAK_BF16_FLOPS:
        if all(key in words for key in keys):
            return peak
    return None


def peak_flops() -> float | None:
    """The current CUDA device's bf16 peak, or None (a CPU run, an unknown device)."""
    from pretrain.distributed import cuda_enabled

    if not cuda_enabled():
        return None
    return peak_for_name(torch.cuda.get_device_name())


def flops_per_token(config, output_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6 x the matmul parameters (blocks, adaLN, output layer)
    plus the attention score and value products (forward 4 L h per layer, x3 for training).
    ``output_fraction`` counts the output layer at that share of the positions (the masked
    path projects only the masked ones, half of them on average); 1 is the dense count."""
    h, layers = config.hidden_size, config.n_blocks
    ada = 6 * h * config.cond_dim if config.backbone == "dit" else 0
    matmul_params = layers * (12 * h * h + ada) + output_fraction * h * config.vocab_size
    return 6 * matmul_params + 3 * layers * 4 * config.length * h
