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
from model.dit import mixed_precision, set_attn_backend
from model.layers import EmbeddingLayer, LayerNorm, Rotary, apply_rotary, mlp

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

    def forward(self, x, cos, sin):
        qkv = self.attn_qkv(self.norm1(x))
        qkv = qkv.view(*qkv.shape[:2], 3, self.n_heads, -1)
        qkv = apply_rotary(qkv, cos, sin)
        h = self.attn_out(attention(qkv, True, self.attn_backend))
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        h = self.mlp(self.norm2(x))
        return x + F.dropout(h, p=self.dropout, training=self.training)


class CausalFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
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

    def forward(self, indices: torch.Tensor, sigma=None) -> torch.Tensor:
        """Log-probabilities of the next token at every position; ``sigma`` is ignored."""
        device = indices.device
        set_attn_backend(self.blocks, self.config.attn_backend, device)
        x = self.vocab_embed(indices)
        cos, sin = self.rotary_emb(indices.shape[1], device)
        with mixed_precision(self.config, device):
            for block in self.blocks:
                x = block(x, cos, sin)
            logits = self.output_layer(x)
        logits[:, :, self.mask_index] = MASK_LOGIT
        return logits.log_softmax(-1)
