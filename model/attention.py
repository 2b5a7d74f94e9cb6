"""Multi-head attention over a packed qkv tensor: PyTorch SDPA, or flash-attn on CUDA."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from model.errors import ConfigError


@functools.lru_cache(maxsize=1)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_qkvpacked_func
    except ImportError:
        return None
    return flash_attn_qkvpacked_func


def flash_available() -> bool:
    return _flash_attn_func() is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    """Maps ``auto|sdpa|flash`` to the backend used on ``device``."""
    if requested == "sdpa":
        return "sdpa"
    usable = flash_available() and device.type == "cuda"
    if requested == "flash":
        if not usable:
            raise ConfigError(
                "model.attn_backend=flash needs the flash-attn package and a CUDA device; "
                "install the 'flash' extra or use model.attn_backend=sdpa."
            )
        return "flash"
    return "flash" if usable else "sdpa"


def attention(qkv: torch.Tensor, causal: bool, backend: str,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """qkv: (batch, seq, 3, heads, head_dim) -> (batch, seq, heads * head_dim). ``mask``
    (seq, seq) boolean, True where a query may attend to a key, takes SDPA whatever the
    backend (flash-attn has no arbitrary masks)."""
    batch, seq = qkv.shape[0], qkv.shape[1]
    if mask is None and backend == "flash" and qkv.dtype in (torch.float16, torch.bfloat16):
        out = _flash_attn_func()(qkv, dropout_p=0.0, causal=causal)
        return out.reshape(batch, seq, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, seq, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                         is_causal=causal and mask is None)
    return out.transpose(1, 2).reshape(batch, seq, -1)
