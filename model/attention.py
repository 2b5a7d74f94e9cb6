"""Multi-head attention over a packed qkv tensor: PyTorch SDPA, flash-attn on CUDA, and
PyTorch's flex attention for block diffusion's masked training pass."""

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


@functools.lru_cache(maxsize=1)
def flex_importable() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa
    except ImportError:
        return False
    return True


def uses_flex(requested: str, device: torch.device) -> bool:
    """Whether block diffusion's masked attention runs through flex attention: with
    ``model.attn_backend=flex`` on CUDA where this torch has it, with ``auto`` there on
    GPUs of compute capability 8.0 or more (where its kernels are tuned); otherwise (flex
    attention has no backward on the CPU) SDPA with the same mask, dense."""
    if device.type != "cuda" or not flex_importable():
        return False
    if requested == "flex":
        return True
    return requested == "auto" and torch.cuda.get_device_capability(device)[0] >= 8


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=None: a new batch size (a last partial batch, each zero-shot dataset) is
    # compiled once as dynamic, not once per size up to dynamo's recompile limit
    return torch.compile(flex_attention, dynamic=None)


def resolve_backend(requested: str, device: torch.device) -> str:
    """Maps ``auto|sdpa|flash|flex`` to the backend of unmasked attention on ``device``
    (``flex`` concerns masked attention only: see ``uses_flex``; unmasked, SDPA)."""
    if requested == "flex" and device.type == "cuda" and not flex_importable():
        raise ConfigError(
            f"model.attn_backend=flex needs torch's flex attention (torch >= 2.5; this is "
            f"{torch.__version__}); upgrade torch or use model.attn_backend=sdpa."
        )
    if requested in ("sdpa", "flex"):
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
    backend (flash-attn has no arbitrary masks); a flex ``BlockMask`` takes flex attention,
    compiled on CUDA (inside a compiled model, compiled with it)."""
    batch, seq = qkv.shape[0], qkv.shape[1]
    if mask is None and backend == "flash" and qkv.dtype in (torch.float16, torch.bfloat16):
        out = _flash_attn_func()(qkv, dropout_p=0.0, causal=causal)
        return out.reshape(batch, seq, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, seq, head_dim)
    if mask is not None and not isinstance(mask, torch.Tensor):  # a flex BlockMask
        from torch.nn.attention.flex_attention import flex_attention

        fused = qkv.device.type == "cuda" and not torch.compiler.is_compiling()
        out = (_compiled_flex() if fused else flex_attention)(q, k, v, block_mask=mask)
        return out.transpose(1, 2).reshape(batch, seq, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                         is_causal=causal and mask is None)
    return out.transpose(1, 2).reshape(batch, seq, -1)
