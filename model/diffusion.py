"""The model: a backbone, a noise schedule and an objective behind one interface.

``Diffusion.forward(xt, sigma)`` returns the parameterized output (log-probabilities over x0
for SUBS and D3PM, the log score for SEDD, next-token log-probabilities for AR) and
``Diffusion.loss(input_ids, attention_mask)`` the per-token losses and their mean over real
tokens. ``Diffusion.backbone(input_ids, sigma)`` is the bare network (float32 logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from model import objectives as obj
from model.causal import CausalTransformer
from model.config import ModelConfig
from model.dit import DIT, as_sigma
from model.noise import get_noise, log_masking_bounds


@dataclass
class Loss:
    loss: torch.Tensor  # scalar: sum of per-token losses / number of real tokens
    nlls: torch.Tensor  # (batch, length) per-token losses, zero at padding
    token_mask: torch.Tensor  # (batch, length) the attention mask the losses count


def build_backbone(config: ModelConfig) -> nn.Module:
    backbone = CausalTransformer(config) if config.backbone == "ar" else DIT(config)
    if config.compile:
        for block in backbone.blocks:
            block.compile()
    return backbone


class Diffusion(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.noise = get_noise(config.noise)
        self.mask_index = config.mask_index
        self.vocab_size = config.vocab_size
        self.parameterization = config.parameterization
        self.T = config.T

    def _process_sigma(self, sigma, batch: int, device) -> torch.Tensor | None:
        if self.parameterization == "ar":
            return None
        return as_sigma(sigma, batch, device, self.config.time_conditioning)

    def forward(self, xt: torch.Tensor, sigma=None) -> torch.Tensor:
        sigma = self._process_sigma(sigma, xt.shape[0], xt.device)
        logits = self.backbone(xt, sigma)
        if self.parameterization == "subs":
            return obj.subs_parameterization(logits, xt, self.mask_index)
        if self.parameterization == "sedd":
            return obj.sedd_parameterization(logits, xt, sigma)
        if self.parameterization == "d3pm":
            return obj.d3pm_parameterization(logits, self.mask_index, self.config.subs_masking)
        return logits

    # ------------------------------------------------------------------ training objective
    def sample_t(self, n: int, device, generator=None) -> torch.Tensor:
        t = obj.sample_t(n, device, self.config.sampling_eps, self.config.antithetic_sampling,
                         generator)
        if self.config.importance_sampling:
            t = self.noise.importance_sampling_transformation(t)
        return t

    def diffusion_losses(self, x0: torch.Tensor, t: torch.Tensor | None = None,
                         generator=None) -> torch.Tensor:
        """Per-token diffusion losses of x0 at times t (drawn as in training when None)."""
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if self.T > 0:
            t = obj.discretize(t, self.T)
        if self.config.change_of_variables:
            conditioning = t
            f_T, f_0 = log_masking_bounds(self.noise, t)
            move_chance = torch.exp(f_0 + t * (f_T - f_0))[:, None]
        else:
            sigma, dsigma = self.noise(t)
            conditioning = sigma
            move_chance = 1 - torch.exp(-sigma[:, None])
        xt = obj.q_xt(x0, move_chance, self.mask_index, generator)
        out = self.forward(xt, conditioning)

        if self.parameterization == "sedd":
            return obj.score_entropy(out, sigma, dsigma, xt, x0, self.mask_index)
        if self.T > 0:
            loss = obj.discrete_time_loss(out, xt, x0, t, self.T, self.mask_index)
            if self.parameterization == "d3pm":
                loss = loss + self.reconstruction_losses(x0)
            return loss
        if self.config.change_of_variables or self.config.importance_sampling:
            return obj.subs.subs_loss_reweighted(out, x0, self.noise.sigma_min)
        return obj.subs_loss(out, x0, sigma, dsigma)

    def reconstruction_losses(self, x0: torch.Tensor) -> torch.Tensor:
        sigma_0 = self.noise(torch.zeros(x0.shape[0], device=x0.device))[0]
        return obj.reconstruction_loss(self.forward(x0, sigma_0), x0)

    def _crop(self, x0, attention_mask, generator=None):
        """Inputs, targets (AR only) and mask; a block twice the model length (text8-crop)
        is cropped at a random offset, as the reference implementation does."""
        length = self.config.length
        if x0.shape[1] > length:
            if x0.shape[1] != 2 * length:
                raise ValueError(
                    f"input blocks of {x0.shape[1]} tokens do not fit model.length={length}; "
                    "blocks must be model.length long (or twice that for cropping)."
                )
            start = int(torch.randint(length, (1,), generator=generator))
            inputs = x0[:, start:start + length].clone()
            targets = x0[:, start + 1:start + length + 1].clone()
            mask = attention_mask[:, start:start + length]
            if self.config.bos_index is not None:
                inputs[:, 0] = self.config.bos_index
            if self.config.eos_index is not None:
                targets[:, -1] = self.config.eos_index
            return inputs, targets, mask
        if self.parameterization == "ar":
            return x0[:, :-1], x0[:, 1:], attention_mask[:, 1:]
        return x0, None, attention_mask

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             t: torch.Tensor | None = None, generator=None) -> Loss:
        """Per-token losses and their mean over the tokens where attention_mask is 1."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs, targets, mask = self._crop(input_ids, attention_mask, generator)
        if self.parameterization == "ar":
            per_token = obj.ar_loss(self.backbone(inputs, None), targets)
        else:
            per_token = self.diffusion_losses(inputs, t, generator)
        nlls = per_token * mask
        return Loss(loss=nlls.sum() / mask.sum(), nlls=nlls, token_mask=mask)
