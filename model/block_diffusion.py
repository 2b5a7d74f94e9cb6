"""Block diffusion (BD3-LM): autoregressive over blocks of ``block_size`` tokens, masked
diffusion within each block.

Training runs the DiT once on x_t and x_0 side by side (2L positions, both halves with the
positions 0..L-1) under ``attention_mask``: every block of x_t sees itself and the clean
blocks before it, so one forward pass gives every block's loss. Each block draws its own
time t (antithetic across the batch and the blocks), clipped to [eps_min, eps_max]; the
masking schedule is linear (a token is masked with probability t) and the SUBS loss at a
masked token weighs 1/t, as the release's log-linear schedule gives.
"""

from __future__ import annotations

import functools

import torch

# the release's default lower clip: its resampling never enforces this bound (a block of a
# few tokens at t near 1e-3 would be redrawn for ever)
DEFAULT_EPS_MIN = 1e-3


def _allowed(q: torch.Tensor, k: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Whether query position ``q`` may attend to key position ``k`` (broadcasting)."""
    q_clean, k_clean = q >= length, k >= length
    q_block, k_block = (q % length) // block_size, (k % length) // block_size
    own_block = (q_block == k_block) & (q_clean == k_clean)
    earlier_clean = (q_block > k_block) & ~q_clean & k_clean
    clean_causal = (q_block >= k_block) & q_clean & k_clean
    return own_block | earlier_clean | clean_causal


@functools.lru_cache(maxsize=8)  # built once per shape, not at every training step
def attention_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(2L, 2L) boolean, True where query i may attend to key j. Positions [0, L) hold x_t
    and [L, 2L) x_0; position p is in block (p mod L) // block_size. x_t attends to its own
    block of x_t and to the blocks of x_0 strictly before it; x_0 attends to its own and the
    earlier blocks of x_0 (block-causal), never to x_t. Built outside inference mode, so a
    first call under ``torch.inference_mode`` does not cache a tensor training cannot use."""
    with torch.inference_mode(False):
        index = torch.arange(2 * length, device=device)
        return _allowed(index[:, None], index[None, :], length, block_size)


@functools.lru_cache(maxsize=8)
def flex_mask(length: int, block_size: int, device=None):
    """``attention_mask`` as a flex-attention ``BlockMask`` (built outside inference mode
    too): tiles no query attends into (x_0 to x_t, the blocks after each query's) are
    skipped, about half of the (2L)^2."""
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(batch, head, q, k):
        return _allowed(q, k, length, block_size)

    with torch.inference_mode(False):  # cached: usable by training after an evaluation
        return create_block_mask(allowed, None, None, 2 * length, 2 * length, device=device)


def block_causal_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(length, length) boolean: position i attends to j when j's block is not after i's
    (what block diffusion's sampler computes, the last block being the noisy one)."""
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]


def sample_block_t(batch: int, n_blocks: int, device, eps_min: float, eps_max: float,
                   antithetic: bool = True, generator: torch.Generator | None = None,
                   ) -> torch.Tensor:
    """(batch, n_blocks) times in [eps_min, eps_max]: u uniform, antithetic over all
    batch x n_blocks draws (element i takes (r_i / n + i / n) mod 1); both bounds at 1
    give t = 1 (every token masked: the likelihood of block size 1)."""
    u = torch.rand(batch, n_blocks, device=device, generator=generator)
    if antithetic:
        n = batch * n_blocks
        offset = (torch.arange(n, device=device) / n).view(batch, n_blocks)
        u = (u / n + offset) % 1
    if eps_min >= 1 and eps_max >= 1:
        return torch.ones_like(u)
    return u * (eps_max - eps_min) + eps_min


def q_xt(x0: torch.Tensor, t: torch.Tensor, block_size: int, mask_index: int,
         eps_min: float, eps_max: float, resample: bool = True,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Masks each token of x0 with its block's probability t (batch, n_blocks). With
    ``resample``, a block whose masked share falls outside [eps_min, eps_max] is drawn
    again until it lies inside (the lower bound only when above ``DEFAULT_EPS_MIN``, the
    upper only when below 1), as the release does for its clipped schedules."""
    batch, length = x0.shape
    if block_size == 1 and eps_min >= 1:
        return torch.full_like(x0, mask_index)
    p = t.repeat_interleave(block_size, dim=1)
    move = torch.rand(batch, length, device=x0.device, generator=generator) <= p
    check_low, check_high = eps_min > DEFAULT_EPS_MIN, eps_max < 1
    while resample and (check_low or check_high):
        share = move.view(batch, -1, block_size).float().mean(-1)
        bad = torch.zeros_like(share, dtype=torch.bool)
        if check_low:
            bad |= share < eps_min
        if check_high:
            bad |= share > eps_max
        if not bool(bad.any()):
            break
        redraw = torch.rand(batch, length, device=x0.device, generator=generator) <= p
        move = torch.where(bad.repeat_interleave(block_size, dim=1), redraw, move)
    return torch.where(move, mask_index, x0)


def loss_weights(t: torch.Tensor, eps_min: float) -> torch.Tensor:
    """The per-block weight of -log p_theta(x0 | ...) at a masked token: 1/t, or 1 when the
    lower clip is above 1/2 (the release's likelihood with every token masked)."""
    if eps_min > 0.5:
        return torch.ones_like(t)
    return 1 / t
