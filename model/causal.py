"""The causal transformer of the autoregressive baseline.

Same blocks as the DiT without adaLN; identical to the released AR network, so its state
dict loads as it is. ``forward`` returns float32 next-token log-probabilities in which the
[MASK] token never gets probability.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import attention
from model.config import ModelConfig
from model.dit import flat_positions, mixed_precision, run_blocks, set_attn_backend
from model.layers import EmbeddingLayer, LayerNorm, Rotary, apply_rotary, mlp
from model.projection import Projection

MASK_LOGIT = -1000.0  # the value the reference AR network writes at the [MASK] logit


class CausalBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = mlp(dim)
        self.attn_backend = "sdpa"

    def forward(self, x, cos, sin, cache: list | None = None):
        """``cache`` (decoding): a [keys, values] pair of earlier positions, extended in
        place; ``cos``/``sin`` are then those of the new positions."""
        qkv = self.attn_qkv(self.norm1(x))
        qkv = qkv.view(*qkv.shape[:2], 3, self.n_heads, -1)
        qkv = apply_rotary(qkv, cos, sin)
        if cache is None:
            h = self.attn_out(attention(qkv, True, self.attn_backend))
        else:
            h = self.attn_out(cached_attention(qkv, cache))
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        h = self.mlp(self.norm2(x))
        return x + F.dropout(h, p=self.dropout, training=self.training)


def cached_attention(qkv: torch.Tensor, cache: list) -> torch.Tensor:
    """Causal attention of new positions over the cached ones and themselves."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (batch, heads, new, head_dim)
    if cache[0] is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    cache[0], cache[1] = k, v
    new, total = q.shape[2], k.shape[2]
    mask = None
    if new > 1:
        mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(total - new)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape[0], new, -1)


class CausalFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = Projection(hidden_size, out_channels)
        self.linear.weight.data.zero_()
        self.linear.bias.data.zero_()

    def forward(self, x):
        return self.linear(self.norm_final(x)).float()


class CausalTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.mask_index = config.mask_index
        self.vocab_embed = EmbeddingLayer(config.hidden_size, config.vocab_size)
        self.rotary_emb = Rotary(config.hidden_size // config.n_heads)
        self.blocks = nn.ModuleList(
            CausalBlock(config.hidden_size, config.n_heads, config.dropout)
            for _ in range(config.n_blocks)
        )
        self.output_layer = CausalFinalLayer(config.hidden_size, config.vocab_size)

    def trunk(self, indices: torch.Tensor) -> torch.Tensor:
        """The last block's hidden states, (batch, length, hidden)."""
        device = indices.device
        set_attn_backend(self.blocks, self.config.attn_backend, device)
        x = self.vocab_embed(indices)
        cos, sin = self.rotary_emb(indices.shape[1], device)
        with mixed_precision(self.config, device):
            return run_blocks(self.blocks, x, (cos, sin), self.config.activation_checkpointing)

    def forward(self, indices: torch.Tensor, sigma=None) -> torch.Tensor:
        """Log-probabilities of the next token at every position; ``sigma`` is ignored."""
        x = self.trunk(indices)
        with mixed_precision(self.config, indices.device):
            logits = self.output_layer(x)
        logits[:, :, self.mask_index] = MASK_LOGIT
        return logits.log_softmax(-1)

    def row_losses(self, indices: torch.Tensor, sigma, positions, row_loss, aux=(),
                   row_weights=None, fill=None):
        """As ``DIT.row_losses``; ``positions`` None scores every position (rows in
        batch-major order), without waiting on the device to count them."""
        x = self.trunk(indices)
        with mixed_precision(self.config, indices.device):
            h = self.output_layer.norm_final(x)
            h = h.reshape(-1, h.shape[-1])
            if positions is not None:
                h = h.index_select(0, flat_positions(positions, x.shape[1]))
            return self.output_layer.linear(h, row_loss, aux, row_weights,
                                            self.config.loss_chunk_rows, fill)

    def new_cache(self) -> list:
        return [[None, None] for _ in self.blocks]

    def forward_cached(self, indices: torch.Tensor, cache: list) -> torch.Tensor:
        """Log-probabilities for ``indices`` (batch, new) that follow the positions held in
        ``cache`` (from ``new_cache``), which this call extends."""
        device = indices.device
        start = 0 if cache[0][0] is None else cache[0][0].shape[2]
        x = self.vocab_embed(indices)
        cos, sin = self.rotary_emb(start + indices.shape[1], device)
        cos, sin = cos[start:], sin[start:]
        with mixed_precision(self.config, device):
            for block, layer_cache in zip(self.blocks, cache):
                x = block(x, cos, sin, layer_cache)
            logits = self.output_layer(x)
        logits[:, :, self.mask_index] = MASK_LOGIT
        return logits.log_softmax(-1)
