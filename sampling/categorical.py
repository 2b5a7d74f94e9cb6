"""Categorical draws by the Gumbel-max trick, on unnormalised probabilities.

The noise is drawn in chunks of whole rows (the last axis is the category), so the extra
memory of a draw stays under ``CHUNK_ELEMENTS`` noise values whatever the batch: one
float64 draw over 64 samples x 1024 positions x 50258 tokens would otherwise allocate
26 GB per temporary. On the CPU the chunks follow memory order, so a generator yields the
same numbers as one draw over the whole tensor and the tokens do not depend on the chunking.
"""

from __future__ import annotations

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32}

# noise values per chunk: 64 MiB of float64
CHUNK_ELEMENTS = 1 << 23


def rows_per_chunk(num_categories: int) -> int:
    """Rows of ``num_categories`` entries that fit one chunk (at least one row)."""
    return max(1, CHUNK_ELEMENTS // max(num_categories, 1))


def _gumbel_argmax(probs: torch.Tensor, generator, dtype: torch.dtype) -> torch.Tensor:
    """argmax(probs / E) over the last axis of a (rows, categories) block, the noise E built
    in place in a single buffer."""
    noise = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=dtype)
    noise.add_(1e-10).log_().neg_().add_(1e-10)  # E = 1e-10 - log(U + 1e-10)
    if torch.promote_types(probs.dtype, dtype) != dtype:
        probs = probs.to(dtype)  # rounded first, as the release's probs.to(dtype) does
    torch.div(probs, noise, out=noise)
    return noise.argmax(dim=-1)


def sample_categorical(probs: torch.Tensor, generator=None,
                       gumbel_dtype: str = "float64") -> torch.Tensor:
    """argmax(probs / E) with E = 1e-10 - log(U + 1e-10): the release's draw. Float64 noise
    by default (float32 noise measurably lowers sample diversity); ``float32`` reproduces
    the release's draws. Returns the indices, of shape ``probs.shape[:-1]``."""
    dtype = DTYPES[gumbel_dtype]
    flat = probs.reshape(-1, probs.shape[-1])
    step = rows_per_chunk(flat.shape[1])
    if flat.shape[0] <= step:
        return _gumbel_argmax(flat, generator, dtype).reshape(probs.shape[:-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=probs.device)
    for start in range(0, flat.shape[0], step):
        out[start:start + step] = _gumbel_argmax(flat[start:start + step], generator, dtype)
    return out.reshape(probs.shape[:-1])
