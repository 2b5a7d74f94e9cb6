"""Block diffusion sampling (parameterization=bd3lm): block after block, a diffusion sampler
inside each block, the keys and values of the clean prefix kept across blocks.

Each block starts fully masked and sees the clean tokens before it and itself (what the
training mask gives x_t). Inside a block:

- ``ddpm_cache``: ``steps`` ancestral steps of the linear schedule (masked at t with
  probability t): at step t -> s a masked token stays masked with probability s/t, else it
  takes a token of p_theta; the prediction is reused while the block does not change.
- ``first_hitting``: one token per network call, at a position uniform among the masked
  ones, drawn from p_theta (the exact law of the continuous-time sampler, whose event
  times a model without time conditioning does not need).

Both take temperature and nucleus (``top_p``) on p_theta. With ``kv_cache`` (default) a
finished block is run once more, clean, and its keys and values join the cache; without
it, the prefix is recomputed at every network call (the same tokens under the same noise,
a test checks). Past ``model.length`` tokens the oldest blocks leave a sliding window (the
positions restart at its start). Samples may stop early, row by row: at their second EOS
(the first is the BOS) with ``stop_at_eos``, or when the unigram entropy of their last 256
tokens falls below ``min_entropy`` (the BD3-LM release's rule, with 4 nats).
"""

from __future__ import annotations

import torch

from model.block_diffusion import block_causal_mask
from sampling.categorical import sample_categorical
from sampling.warp import warp

PREDICTORS = ("ddpm_cache", "first_hitting")
ENTROPY_WINDOW = 256


def _entropy(tokens: torch.Tensor) -> torch.Tensor:
    """Unigram entropy (nats) of each row of ``tokens``."""
    out = torch.empty(tokens.shape[0], dtype=torch.float64, device=tokens.device)
    for row in range(tokens.shape[0]):
        counts = torch.unique(tokens[row], return_counts=True)[1].double()
        out[row] = torch.special.entr(counts / counts.sum()).sum()
    return out


class _Network:
    """p_theta(x0 | block, prefix) of one block, with the prefix cached or recomputed."""

    def __init__(self, model, kv_cache: bool, temperature: float, top_p: float):
        self.model, self.backbone = model, model.backbone
        self.kv_cache, self.temperature, self.top_p = kv_cache, temperature, top_p
        self.block_size, self.window = model.config.blocks, model.config.length
        self.cache = None
        self.calls = 0

    def probs(self, prefix: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """Float64 (batch, block, vocab) probabilities after temperature and nucleus."""
        self.calls += 1
        if self.kv_cache:
            logits, _ = self.backbone.extend(block, self.cache)
        else:
            seq = torch.cat([prefix[:, prefix.shape[1] - self._kept(prefix):], block], 1)
            mask = block_causal_mask(seq.shape[1], self.block_size, seq.device)
            logits = self.backbone(seq, None, attn_mask=mask)[:, -block.shape[1]:]
        logits = logits.float()
        logits[..., self.model.mask_index] = -torch.inf  # SUBS: [MASK] is never predicted
        return warp(logits.softmax(-1), self.temperature, self.top_p)

    def _kept(self, prefix: torch.Tensor) -> int:
        """Prefix tokens inside the window that the next block completes."""
        return min(prefix.shape[1], self.window - self.block_size)

    def commit(self, block: torch.Tensor) -> None:
        """A finished block joins the cache (the oldest block leaves a full window)."""
        if not self.kv_cache:
            return
        _, self.cache = self.backbone.extend(block, self.cache, logits=False)
        if self.cache[0][0].shape[1] > self.window - self.block_size:
            self.cache = [(k[:, self.block_size:], v[:, self.block_size:])
                          for k, v in self.cache]


@torch.no_grad()
def block_sample(model, batch_size: int, length: int, steps: int = 128, *,
                 predictor: str = "ddpm_cache", generator=None, kv_cache: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, stop_at_eos: bool = False,
                 min_entropy: float | None = None, gumbel_dtype: str = "float64",
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Samples ``batch_size`` sequences of up to ``length`` tokens (a multiple of the block
    size; any length, beyond ``model.length`` too). Returns (tokens (batch, generated),
    per-row lengths, network calls for predictions)."""
    config = model.config
    if config.parameterization != "bd3lm":
        raise ValueError(f"block_sample samples parameterization=bd3lm models, not "
                         f"parameterization={config.parameterization}.")
    if predictor not in PREDICTORS:
        raise ValueError(f"sampling.predictor={predictor!r} is not a block diffusion sampler; "
                         f"use one of {list(PREDICTORS)}.")
    block_size = config.blocks
    if length % block_size or length < block_size:
        raise ValueError(f"sampling length {length} must be a positive multiple of "
                         f"block_size={block_size}.")
    device = next(model.parameters()).device
    mask_index = model.mask_index
    net = _Network(model, kv_cache, temperature, top_p)
    tokens = torch.empty(batch_size, 0, dtype=torch.long, device=device)
    lengths = torch.full((batch_size,), length, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    rows = torch.arange(batch_size, device=device)
    for start in range(0, length, block_size):
        block = torch.full((batch_size, block_size), mask_index, dtype=torch.long,
                           device=device)
        if start == 0 and config.bos_index is not None:
            block[:, 0] = config.bos_index
        if predictor == "first_hitting":
            while bool((block == mask_index).any()):
                masked = (block == mask_index).double()
                cols = sample_categorical(masked, generator, gumbel_dtype)
                probs = net.probs(tokens, block)[rows, cols]
                block[rows, cols] = sample_categorical(probs, generator, gumbel_dtype)
        else:
            p_x0 = None
            for i in range(steps):
                if not bool((block == mask_index).any()):
                    break
                t, s = 1 - i / steps, 1 - (i + 1) / steps
                if p_x0 is None:
                    p_x0 = net.probs(tokens, block)
                q_xs = p_x0 * (1 - s / t)
                q_xs[..., mask_index] = s / t
                new = torch.where(block == mask_index,
                                  sample_categorical(q_xs, generator, gumbel_dtype), block)
                if not torch.equal(new, block):
                    p_x0 = None
                block = new
        net.commit(block)
        tokens = torch.cat([tokens, block], 1)
        if stop_at_eos and config.eos_index is not None:
            eos = (tokens == config.eos_index).cumsum(1)
            need = 1 + int(config.bos_index == config.eos_index)  # the BOS counts once
            ended = ~done & (eos[:, -1] >= need)
            lengths[ended] = (eos[ended] < need).sum(1) + 1
            done |= ended
        if min_entropy is not None and tokens.shape[1] >= ENTROPY_WINDOW:
            flat = ~done & (_entropy(tokens[:, -ENTROPY_WINDOW:]) < min_entropy)
            lengths[flat] = tokens.shape[1] - ENTROPY_WINDOW
            done |= flat
        if bool(done.all()):
            break
    return tokens, torch.minimum(lengths, torch.tensor(tokens.shape[1])), net.calls
