"""Semi-autoregressive generation: a window of ``length`` tokens slides forward.

The first window is sampled from scratch. Each of the ``num_strides`` next windows keeps the
last ``length - stride_length`` tokens of the previous one as a clean prefix and samples
``stride_length`` new tokens after it, giving ``length + num_strides * stride_length``
tokens in all. Any registered predictor samples the windows.
"""

from __future__ import annotations

import torch

from sampling.diffusion import sample
from sampling.knobs import SamplingError


@torch.no_grad()
def semi_ar_sample(model, batch_size: int, length: int, stride_length: int, num_strides: int,
                   **kwargs):
    """Returns (tokens of shape (batch, length + num_strides * stride_length), NFE)."""
    if not 0 < stride_length < length:
        raise SamplingError(f"sampling.stride_length={stride_length} must lie in (0, "
                            f"model.length={length}) for sampling.semi_ar=True.")
    window, nfe = sample(model, batch_size, length, **kwargs)
    pieces = [window]
    for _ in range(num_strides):
        prefix = window[:, stride_length:]
        window, calls = sample(model, batch_size, length, prefix=prefix, **kwargs)
        nfe += calls
        pieces.append(window[:, length - stride_length:])
    return torch.cat(pieces, dim=1), nfe
