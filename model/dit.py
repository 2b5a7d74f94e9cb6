"""The diffusion transformer (DiT) backbone of MDLM, SEDD and D3PM.

Architecturally identical to the released MDLM DiT: its state dict loads here as it is.
``DIT(indices, sigma)`` returns float32 logits of shape (batch, length, vocab). Under
mixed precision (``model.autocast``, bf16 on CUDA by default) the blocks and the output
projection run in bf16 exactly where the release's do; LayerNorm, the time embedding and
rotary embedding are computed in float32.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from model import block_diffusion
from model.attention import attention, resolve_backend, uses_flex
from model.config import ModelConfig
from model.layers import (
    EmbeddingLayer,
    LayerNorm,
    Rotary,
    TimestepEmbedder,
    apply_rotary,
    autocast_dtype,
    mlp,
    modulate,
    rotate,
)
from model.projection import Projection


class DDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN shift/scale/gate for attention and MLP."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float = 0.1,
                 causal: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = mlp(dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        self.adaLN_modulation.weight.data.zero_()
        self.adaLN_modulation.bias.data.zero_()
        self.attn_backend = "sdpa"

    def _attend(self, x, cos, sin, mask=None):
        qkv = self.attn_qkv(x)
        qkv = qkv.view(*qkv.shape[:2], 3, self.n_heads, -1)
        qkv = apply_rotary(qkv, cos, sin)
        return self.attn_out(attention(qkv, self.causal, self.attn_backend, mask))

    def forward(self, x, cos, sin, c, mask=None):
        """``mask`` (seq, seq) boolean: which keys each query may attend to (block
        diffusion's x_t and x_0 side by side); None attends to every position."""
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        h = self._attend(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin, mask)
        return self._mlp(x, h, gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def _mlp(self, x, h, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        """The attention output ``h`` added to ``x``, then the MLP half of the block."""
        x = x + gate_msa * F.dropout(h, p=self.dropout, training=self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(h, p=self.dropout, training=self.training)

    def extend(self, x, cos, sin, c, past=None):
        """Block diffusion's sampling step through this block: ``x`` (batch, b, hidden), a
        block after the cached prefix ``past`` = (k, v) (batch, n, heads, head_dim), its keys
        and values before rotary (None: no prefix), attending to the whole prefix and
        itself. ``cos``/``sin`` cover the positions of prefix and block. Returns the block's
        output and (k, v) of prefix and block."""
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        q, k, v = qkv.view(*qkv.shape[:2], 3, self.n_heads, -1).unbind(2)
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        n, b = k.shape[1], x.shape[1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            q_rot, k_rot = rotate(q, cos[n - b:n], sin[n - b:n]), rotate(k, cos[:n], sin[:n])
        h = F.scaled_dot_product_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2),
                                           v.transpose(1, 2))
        h = self.attn_out(h.transpose(1, 2).reshape(*x.shape[:2], -1))
        return self._mlp(x, h, gate_msa, shift_mlp, scale_mlp, gate_mlp), (k, v)


class DDitFinalLayer(nn.Module):
    """LayerNorm, adaLN shift/scale, then a float32 Linear to the vocabulary."""

    def __init__(self, hidden_size: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = Projection(hidden_size, out_channels)
        self.linear.weight.data.zero_()
        self.linear.bias.data.zero_()
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)
        self.adaLN_modulation.weight.data.zero_()
        self.adaLN_modulation.bias.data.zero_()

    def features(self, x, c):
        """The normalised, modulated hidden states the projection reads."""
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x, c):
        # Under autocast the projection runs in the autocast dtype, as in the release; the
        # logits are returned in float32.
        return self.linear(self.features(x, c)).float()


def mixed_precision(config: ModelConfig, device: torch.device):
    dtype = autocast_dtype(config.autocast, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def as_sigma(sigma, batch: int, device: torch.device, time_conditioning: bool) -> torch.Tensor:
    """Normalises sigma to shape (batch,); zero when the model is not time conditioned."""
    if not time_conditioning:
        return torch.zeros(batch, device=device)
    if sigma is None:
        raise ValueError("this model is time conditioned: pass sigma (the total noise of "
                         "each sequence) to its forward.")
    sigma = torch.as_tensor(sigma, device=device, dtype=torch.float32)
    if sigma.ndim == 0:
        return sigma.expand(batch)
    return sigma.reshape(batch)


class DIT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.vocab_embed = EmbeddingLayer(config.hidden_size, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.hidden_size // config.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(config.hidden_size, config.n_heads, config.cond_dim, config.dropout)
            for _ in range(config.n_blocks)
        )
        self.output_layer = DDitFinalLayer(config.hidden_size, config.vocab_size,
                                           config.cond_dim)

    def _embed(self, indices: torch.Tensor, sigma):
        """The token embeddings and the conditioning c (float32) of ``indices``."""
        device = indices.device
        set_attn_backend(self.blocks, self.config.attn_backend, device)
        sigma = as_sigma(sigma, indices.shape[0], device, self.config.time_conditioning)
        with torch.autocast(device_type=device.type, enabled=False):
            c = F.silu(self.sigma_map(sigma.float()))
        return self.vocab_embed(indices), c

    def trunk(self, indices: torch.Tensor, sigma=None, clean: torch.Tensor | None = None,
              attn_mask: torch.Tensor | None = None):
        """The last block's hidden states (batch, length, hidden) and the conditioning c.

        ``clean`` (block diffusion's training pass): x_0 beside x_t = ``indices``, both at
        positions 0..L-1, under ``block_diffusion.attention_mask``; the hidden states of
        the x_t half are returned. ``attn_mask`` (length, length) boolean: which positions
        each may attend to (None: all)."""
        device = indices.device
        length = indices.shape[1]
        x, c = self._embed(indices if clean is None else torch.cat([indices, clean], 1),
                           sigma)
        cos, sin = self.rotary_emb(length, device)
        if clean is not None:
            training_mask = (block_diffusion.flex_mask
                             if uses_flex(self.config.attn_backend, device)
                             else block_diffusion.attention_mask)
            mask = training_mask(length, self.config.blocks, device)
            args = (torch.cat([cos, cos]), torch.cat([sin, sin]), c, mask)
        else:
            args = (cos, sin, c) if attn_mask is None else (cos, sin, c, attn_mask)
        with mixed_precision(self.config, device):
            x = run_blocks(self.blocks, x, args, self.config.activation_checkpointing)
        return x[:, :length], c

    def forward(self, indices: torch.Tensor, sigma=None, positions=None,
                clean=None, attn_mask=None) -> torch.Tensor:
        """``positions`` = (rows, cols) projects only those positions onto the vocabulary and
        returns their logits, shape (k, vocab) (samplers that need a few rows). ``clean``
        and ``attn_mask``: as for ``trunk`` (the logits are those of x_t's positions)."""
        x, c = self.trunk(indices, sigma, clean, attn_mask)
        with mixed_precision(self.config, indices.device):
            if positions is not None:
                rows, cols = positions
                return self.output_layer(x[rows, cols][:, None], c[rows])[:, 0]
            return self.output_layer(x, c)

    def row_losses(self, indices: torch.Tensor, sigma, positions, row_loss, aux=(),
                   row_weights=None, fill=None, clean=None):
        """``(sum_i w_i f_i, f)`` with ``f_i = row_loss(logits_i, aux_i)`` at the
        ``positions`` = (rows, cols) only (None: every position, batch-major), projected in
        chunks of ``model.loss_chunk_rows`` rows (see ``model.projection``): the whole
        (batch, length, vocab) logits never exist. ``clean``: as for ``trunk``."""
        x, c = self.trunk(indices, sigma, clean)
        with mixed_precision(self.config, indices.device):
            # the final norm and modulation at every position (elementwise, as the full
            # path computes them), then the rows selected; index_select's backward adds
            # each row once, where indexing x and c at the rows needed CUDA's slow
            # accumulating index_put (each c row gathered hundreds of times)
            h = self.output_layer.features(x, c).reshape(-1, x.shape[-1])
            if positions is not None:
                h = h.index_select(0, flat_positions(positions, x.shape[1]))
            return self.output_layer.linear(h, row_loss, aux, row_weights,
                                            self.config.loss_chunk_rows, fill)

    def extend(self, block: torch.Tensor, cache: list | None, sigma=None,
               logits: bool = True):
        """Block diffusion's sampling pass over one block: ``block`` (batch, b) after the
        prefix whose per-layer keys and values ``cache`` holds (None: none), seeing the
        whole prefix and itself. Returns (logits of the block's positions or None, the
        cache with the block appended); the positions of prefix and block are 0..n-1."""
        device = block.device
        x, c = self._embed(block, sigma)
        n = block.shape[1] + (0 if cache is None else cache[0][0].shape[1])
        cos, sin = self.rotary_emb(n, device)
        new_cache = []
        with mixed_precision(self.config, device):
            for i, layer in enumerate(self.blocks):
                x, kv = layer.extend(x, cos, sin, c, None if cache is None else cache[i])
                new_cache.append(kv)
            out = self.output_layer(x, c) if logits else None
        return out, new_cache


def flat_positions(positions, length: int) -> torch.Tensor:
    """(rows, cols) as indices into the (batch * length) positions, batch-major."""
    rows, cols = positions
    return rows * length + cols


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, args: tuple,
               checkpointing: bool) -> torch.Tensor:
    """The blocks in order; with ``checkpointing`` (and gradients on) each block keeps only
    its input and recomputes its activations in backward (same RNG, so same dropout)."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


def set_attn_backend(blocks: nn.ModuleList, requested: str, device: torch.device) -> None:
    backend = resolve_backend(requested, device)
    if blocks[0].attn_backend != backend:
        for block in blocks:
            block.attn_backend = backend
