"""The networks of an exported MDLM checkpoint, for ``trust_remote_code=True``.

A self-contained copy of this project's backbones (``model/dit.py``, ``model/causal.py``,
``model/layers.py``) that needs only ``torch`` and ``transformers``: the DiT of MDLM, SEDD
and D3PM (adaLN time conditioning, rotary embeddings) and the causal transformer of the
autoregressive baseline. Parameter names are the release's, under ``backbone.``, so the
exported ``model.safetensors`` loads as it is. Attention is PyTorch's SDPA; everything runs
in the weights' dtype (float32 as exported).

    model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)
    logits = model(input_ids, timesteps=sigma)   # (batch, length, vocab), as the release's
    logits = model(input_ids, timesteps=sigma, return_dict=True).logits   # the same

``timesteps`` is sigma, the total noise of each sequence (ignored unless the model is time
conditioned). The DiT returns logits; the causal transformer returns next-token
log-probabilities with the [MASK] token's logit set to -1000 before the log-softmax, as the
project's own backbone does. This file is copied beside the weights: it must not import
anything of this project.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_mdlm import MDLMConfig

MASK_LOGIT = -1000.0


class LayerNorm(nn.Module):
    """Weight-only LayerNorm computed in float32."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x):
        return F.layer_norm(x.float(), [self.dim]) * self.weight[None, None, :]


class EmbeddingLayer(nn.Module):
    def __init__(self, dim, vocab_dim):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x):
        return self.embedding[x]


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of sigma; frequencies computed in float32 on the CPU."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs.to(t.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        embedding = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


def rotary_frequencies(dim, base=10_000):
    return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half layout, base 10000). The angles are computed
    from the head size at every call, never from the ``inv_freq`` buffer, which is kept
    only so that the state dict has the release's keys."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", rotary_frequencies(dim))

    def forward(self, seq_len, device):
        t = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, rotary_frequencies(self.dim).to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(qkv, cos, sin):
    """Rotates q and k of a (batch, seq, 3, heads, head_dim) tensor in float32."""
    dtype = qkv.dtype
    cos = cos.to(dtype).float()[None, :, None, :]
    sin = sin.to(dtype).float()[None, :, None, :]
    q, k, v = qkv.unbind(2)
    q, k = q.float(), k.float()
    q = (q * cos + rotate_half(q) * sin).to(dtype)
    k = (k * cos + rotate_half(k) * sin).to(dtype)
    return torch.stack((q, k, v), dim=2)


def attention(qkv, causal):
    """qkv: (batch, seq, 3, heads, head_dim) -> (batch, seq, heads * head_dim), by SDPA."""
    batch, seq = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(batch, seq, -1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def mlp(dim, ratio=4):
    return nn.Sequential(
        nn.Linear(dim, ratio * dim, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(ratio * dim, dim, bias=True),
    )


class DDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN shift/scale/gate for attention and MLP."""

    def __init__(self, dim, n_heads, cond_dim, dropout=0.1):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = mlp(dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)

    def forward(self, x, cos, sin, c):
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        qkv = apply_rotary(qkv.view(*qkv.shape[:2], 3, self.n_heads, -1), cos, sin)
        h = self.attn_out(attention(qkv, causal=False))
        x = x + gate_msa * F.dropout(h, p=self.dropout, training=self.training)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(h, p=self.dropout, training=self.training)


class DDitFinalLayer(nn.Module):
    def __init__(self, hidden_size, out_channels, cond_dim):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale)).float()


class DIT(nn.Module):
    """The diffusion transformer: (indices, sigma) -> float32 logits."""

    def __init__(self, config):
        super().__init__()
        self.time_conditioning = config.time_conditioning
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.hidden_dim // config.n_heads)
        self.blocks = nn.ModuleList(
            DDiTBlock(config.hidden_dim, config.n_heads, config.cond_dim, config.dropout)
            for _ in range(config.n_blocks)
        )
        self.output_layer = DDitFinalLayer(config.hidden_dim, config.vocab_size,
                                           config.cond_dim)

    def forward(self, indices, sigma=None, output_hidden_states=False):
        batch = indices.shape[0]
        if not self.time_conditioning:
            sigma = torch.zeros(batch, device=indices.device)
        elif sigma is None:
            raise ValueError("this model is time conditioned: pass timesteps (sigma, the "
                             "total noise of each sequence) to its forward.")
        else:
            sigma = torch.as_tensor(sigma, device=indices.device, dtype=torch.float32)
            sigma = sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)
        x = self.vocab_embed(indices)
        c = F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb(indices.shape[1], indices.device)
        hidden = [x]
        for block in self.blocks:
            x = block(x, cos, sin, c)
            hidden.append(x)
        return self.output_layer(x, c), tuple(hidden) if output_hidden_states else None


class CausalBlock(nn.Module):
    def __init__(self, dim, n_heads, dropout=0.1):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = mlp(dim)

    def forward(self, x, cos, sin):
        qkv = self.attn_qkv(self.norm1(x))
        qkv = apply_rotary(qkv.view(*qkv.shape[:2], 3, self.n_heads, -1), cos, sin)
        h = self.attn_out(attention(qkv, causal=True))
        x = x + F.dropout(h, p=self.dropout, training=self.training)
        h = self.mlp(self.norm2(x))
        return x + F.dropout(h, p=self.dropout, training=self.training)


class CausalFinalLayer(nn.Module):
    def __init__(self, hidden_size, out_channels):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x):
        return self.linear(self.norm_final(x)).float()


class CausalTransformer(nn.Module):
    """The autoregressive baseline: indices -> float32 next-token log-probabilities."""

    def __init__(self, config):
        super().__init__()
        self.mask_index = config.mask_index
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.rotary_emb = Rotary(config.hidden_dim // config.n_heads)
        self.blocks = nn.ModuleList(
            CausalBlock(config.hidden_dim, config.n_heads, config.dropout)
            for _ in range(config.n_blocks)
        )
        self.output_layer = CausalFinalLayer(config.hidden_dim, config.vocab_size)

    def forward(self, indices, sigma=None, output_hidden_states=False):
        x = self.vocab_embed(indices)
        cos, sin = self.rotary_emb(indices.shape[1], indices.device)
        hidden = [x]
        for block in self.blocks:
            x = block(x, cos, sin)
            hidden.append(x)
        logits = self.output_layer(x)
        logits[:, :, self.mask_index] = MASK_LOGIT
        return logits.log_softmax(-1), tuple(hidden) if output_hidden_states else None


class MDLM(PreTrainedModel):
    """An exported checkpoint of any family: ``config.backbone`` picks the network."""

    config_class = MDLMConfig
    base_model_prefix = "mdlm"
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        if config.backbone not in ("dit", "ar"):
            raise ValueError(f"backbone={config.backbone!r} is not known; this file builds "
                             "'dit' or 'ar'.")
        self.backbone = CausalTransformer(config) if config.backbone == "ar" else DIT(config)
        self.post_init()

    def _init_weights(self, module):
        # Every weight comes from the checkpoint; the constructors' values stand.
        pass

    def forward(self, input_ids=None, timesteps=None, output_hidden_states=None,
                return_dict=None, sigma=None, **kwargs):
        """(batch, length) token ids and sigma (``timesteps``, or ``sigma``) -> logits of
        shape (batch, length, vocab)."""
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        logits, hidden = self.backbone(input_ids, timesteps if timesteps is not None else sigma,
                                       output_hidden_states)
        if return_dict:
            return MaskedLMOutput(logits=logits, hidden_states=hidden)
        # the release's remote code returns the bare logits: its hf_dit path relies on it
        return (logits, hidden) if output_hidden_states else logits
