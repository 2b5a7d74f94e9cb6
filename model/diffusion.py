"""The model: a backbone, a noise schedule and an objective behind one interface.

``Diffusion.forward(xt, sigma)`` returns the parameterized output (log-probabilities over x0
for SUBS and D3PM, the log score for SEDD, next-token log-probabilities for AR) and
``Diffusion.loss(input_ids, attention_mask)`` the per-token losses and their mean over real
tokens. ``Diffusion.backbone(input_ids, sigma)`` is the bare network (float32 logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from model import block_diffusion
from model import objectives as obj
from model.causal import MASK_LOGIT, CausalTransformer
from model.config import ModelConfig
from model.dit import DIT, as_sigma
from model.errors import ConfigError
from model.noise import get_noise, log_masking_bounds


@dataclass
class Loss:
    loss: torch.Tensor  # scalar: sum of per-token losses / number of real tokens
    nlls: torch.Tensor  # (batch, length) per-token losses, zero at padding
    token_mask: torch.Tensor  # (batch, length) the attention mask the losses count


@dataclass
class Noised:
    t: torch.Tensor  # (batch,) diffusion times (on the grid when T > 0)
    sigma: torch.Tensor | None  # (batch,) total noise (None under change of variables)
    dsigma: torch.Tensor | None  # (batch,) its time derivative
    conditioning: torch.Tensor  # what the network is given as sigma
    xt: torch.Tensor  # (batch, length) the noised input


def build_backbone(config: ModelConfig) -> nn.Module:
    backbone = CausalTransformer(config) if config.backbone == "ar" else DIT(config)
    if config.compile is True:  # "auto" is decided by the training loop (device, mode)
        compile_backbone(backbone)
    return backbone


def compile_backbone(backbone: nn.Module) -> None:
    """torch.compile for each block, and the training cross entropy's fused kernel."""
    for block in backbone.blocks:
        block.compile()
    backbone.output_layer.linear.compile_loss()


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

    def noised(self, x0: torch.Tensor, t: torch.Tensor | None = None,
               generator=None) -> Noised:
        """Draws t (as in training when None) and x_t, with the network's conditioning."""
        if t is None:
            t = self.sample_t(x0.shape[0], x0.device, generator)
        if self.T > 0:
            t = obj.discretize(t, self.T)
        sigma = dsigma = None
        if self.config.change_of_variables:
            conditioning = t
            f_T, f_0 = log_masking_bounds(self.noise, t)
            move_chance = torch.exp(f_0 + t * (f_T - f_0))[:, None]
        else:
            sigma, dsigma = self.noise(t)
            conditioning = sigma
            move_chance = 1 - torch.exp(-sigma[:, None])
        xt = obj.q_xt(x0, move_chance, self.mask_index, generator)
        return Noised(t, sigma, dsigma, conditioning, xt)

    def diffusion_losses(self, x0: torch.Tensor, t: torch.Tensor | None = None,
                         generator=None) -> torch.Tensor:
        """Per-token diffusion losses of x0 at times t (drawn as in training when None),
        from the full (batch, length, vocab) output: the release's computation."""
        n = self.noised(x0, t, generator)
        out = self.forward(n.xt, n.conditioning)
        if self.parameterization == "sedd":
            return obj.score_entropy(out, n.sigma, n.dsigma, n.xt, x0, self.mask_index)
        if self.T > 0:
            loss = obj.discrete_time_loss(out, n.xt, x0, n.t, self.T, self.mask_index)
            if self.parameterization == "d3pm":
                loss = loss + self.reconstruction_losses(x0)
            return loss
        if self.config.change_of_variables or self.config.importance_sampling:
            return obj.subs.subs_loss_reweighted(out, x0, self.noise.sigma_min)
        return obj.subs_loss(out, x0, n.sigma, n.dsigma)

    def masked_losses(self, x0: torch.Tensor, mask: torch.Tensor, t=None,
                      generator=None, keep: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusion loss where it can be nonzero only: at the masked real positions of
        x_t the network's output is projected and scored in chunks (``model.projection``).
        Same draws as ``diffusion_losses``. Returns (sum of per-token losses, which carries
        the gradient; per-token losses (batch, length), zero elsewhere, as values).

        ``keep`` (batch, length), when given, marks positions that stay clean in x_t (a
        prompt): with ``mask`` covering the rest, the sum bounds -log p(rest | prompt)."""
        n = self.noised(x0, t, generator)
        if keep is not None:
            n.xt = torch.where(keep, x0, n.xt)
        rows, cols = ((n.xt == self.mask_index) & (mask != 0)).nonzero(as_tuple=True)
        targets = x0[rows, cols]
        sigma = self._process_sigma(n.conditioning, x0.shape[0], x0.device)
        fill = obj.subs_fill(self.mask_index)  # SUBS: no mass on [MASK]
        if self.parameterization == "sedd":
            row_loss, fill = partial(obj.score_entropy_rows, mask_index=self.mask_index), None
            aux = (targets, obj.esigm1_log(n.sigma)[rows], (1 / torch.expm1(n.sigma))[rows])
            weights = n.dsigma[rows]
        elif self.T > 0:
            row_loss = partial(obj.discrete_time_rows, T=self.T, mask_index=self.mask_index)
            if self.parameterization == "d3pm" and not self.config.subs_masking:
                fill = None
            aux, weights = (targets, n.t[rows]), None
        else:
            row_loss, aux = obj.subs_rows, (targets,)
            if self.config.change_of_variables or self.config.importance_sampling:
                weights = obj.reweighted_weight(self.noise.sigma_min, n.t).expand(len(rows))
            else:
                weights = obj.subs_weight(n.sigma, n.dsigma)[rows]
        total, per_row = self._row_losses(n.xt, sigma, (rows, cols), row_loss, aux, weights,
                                          fill)
        if weights is not None:
            per_row = per_row * weights
        nlls = torch.zeros(x0.shape, dtype=per_row.dtype, device=x0.device)
        nlls[rows, cols] = per_row
        if self.parameterization == "d3pm":
            extra, recon = self.masked_reconstruction(x0, mask)
            total, nlls = total + extra, nlls + recon
        return total, nlls

    # ------------------------------------------------------------------ block diffusion
    def block_noised(self, x0: torch.Tensor, t: torch.Tensor | None = None,
                     generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block diffusion's draws: per-block times t (batch, blocks), drawn as in training
        when None (a (batch,) t applies to every block), and x_t."""
        c = self.config
        batch, n_blocks = x0.shape[0], x0.shape[1] // c.blocks
        if t is None:
            t = block_diffusion.sample_block_t(batch, n_blocks, x0.device, c.sampling_eps_min,
                                               c.sampling_eps_max, c.antithetic_sampling,
                                               generator)
        elif t.ndim == 1:
            t = t[:, None].expand(batch, n_blocks)
        xt = block_diffusion.q_xt(x0, t, c.blocks, self.mask_index, c.sampling_eps_min,
                                  c.sampling_eps_max, c.resample, generator)
        if c.ignore_bos:  # the first token stays clean (and is not scored in evaluation)
            xt[:, 0] = x0[:, 0]
        return t, xt

    def block_losses(self, x0: torch.Tensor, mask: torch.Tensor, t=None, generator=None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block diffusion loss: every block's SUBS loss in one pass over x_t and x_0,
        weighted 1/t at the masked real positions (projected in chunks on the masked path).
        Returns (sum of per-token losses, carrying the gradient; per-token losses)."""
        t, xt = self.block_noised(x0, t, generator)
        weight = block_diffusion.loss_weights(t, self.config.sampling_eps_min)
        weight = weight.repeat_interleave(self.config.blocks, dim=1).float()
        if self.config.loss_path == "full":
            log_p = obj.subs_parameterization(self.backbone(xt, None, clean=x0), xt,
                                              self.mask_index)
            nlls = -log_p.gather(-1, x0[..., None])[..., 0] * weight * mask
            return nlls.sum(), nlls
        rows, cols = ((xt == self.mask_index) & (mask != 0)).nonzero(as_tuple=True)
        weights = weight[rows, cols]
        total, per_row = self._row_losses(xt, None, (rows, cols), obj.subs_rows,
                                          (x0[rows, cols],), weights,
                                          obj.subs_fill(self.mask_index), clean=x0)
        nlls = torch.zeros(x0.shape, dtype=per_row.dtype, device=x0.device)
        nlls[rows, cols] = per_row * weights
        return total, nlls

    def _row_losses(self, xt, sigma, positions, row_loss, aux, weights, fill=None,
                    clean=None):
        """The backbone's chunked ``row_losses``, or for a network with only a forward
        (test doubles, foreign backbones) the same sums from its full output."""
        if hasattr(self.backbone, "row_losses"):  # block diffusion's x_0 goes with it
            extra = {} if clean is None else {"clean": clean}
            return self.backbone.row_losses(xt, sigma, positions, row_loss, aux, weights, fill,
                                            **extra)
        logits = self.backbone(xt, sigma).float()
        logits = logits.reshape(-1, logits.shape[-1]) if positions is None else logits[positions]
        if fill is not None:
            column = torch.tensor([fill[0]], device=logits.device)
            logits = logits.index_fill(-1, column, fill[1])
        per_row = row_loss(logits, *aux)
        total = per_row.sum() if weights is None else (per_row * weights).sum()
        return total, per_row.detach()

    def masked_reconstruction(self, x0: torch.Tensor, mask: torch.Tensor):
        """The D3PM reconstruction term at every real position, projected in chunks."""
        sigma_0 = self.noise(torch.zeros(x0.shape[0], device=x0.device))[0]
        sigma_0 = self._process_sigma(sigma_0, x0.shape[0], x0.device)
        fill = obj.subs_fill(self.mask_index) if self.config.subs_masking else None
        weights = mask.reshape(-1).to(torch.float32)
        total, per_row = self._row_losses(x0, sigma_0, None, obj.reconstruction_rows,
                                          (x0.reshape(-1),), weights, fill)
        return total, (per_row * weights).view(x0.shape)

    def reconstruction_losses(self, x0: torch.Tensor) -> torch.Tensor:
        sigma_0 = self.noise(torch.zeros(x0.shape[0], device=x0.device))[0]
        return obj.reconstruction_loss(self.forward(x0, sigma_0), x0)

    def _crop(self, x0, attention_mask, generator=None):
        """Inputs, targets (AR only) and mask; a block twice the model length (text8-crop)
        is cropped at a random offset, as the reference implementation does."""
        length = self.config.length
        if x0.shape[1] > length:
            if x0.shape[1] != 2 * length:
                raise ConfigError(
                    f"input blocks of {x0.shape[1]} tokens do not fit model.length={length}; "
                    "blocks must be model.length long (or twice that for cropping)."
                )
            # drawn on the generator's own device (a CUDA generator cannot fill a CPU tensor)
            device = generator.device if generator is not None else "cpu"
            start = int(torch.randint(length, (1,), generator=generator, device=device))
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
        """Per-token losses and their mean over the tokens where attention_mask is 1.

        With ``model.loss_path=masked`` (the default) only the positions where the loss can
        be nonzero are projected onto the vocabulary, in chunks; ``loss`` carries the
        gradient and ``nlls`` are values. ``full`` computes every position's logits."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs, targets, mask = self._crop(input_ids, attention_mask, generator)
        if self.parameterization == "bd3lm":
            if self.config.ignore_bos and not self.training:
                mask = mask.clone()
                mask[:, 0] = 0
            total, nlls = self.block_losses(inputs, mask, t, generator)
            return Loss(loss=total / mask.sum(), nlls=nlls, token_mask=mask)
        if self.config.loss_path == "full":
            if self.parameterization == "ar":
                per_token = obj.ar_loss(self.backbone(inputs, None), targets)
            else:
                per_token = self.diffusion_losses(inputs, t, generator)
            nlls = per_token * mask
            return Loss(loss=nlls.sum() / mask.sum(), nlls=nlls, token_mask=mask)
        if self.parameterization == "ar":
            total, nlls = self.ar_losses(inputs, targets, mask)
        else:
            total, nlls = self.masked_losses(inputs, mask, t, generator)
        return Loss(loss=total / mask.sum(), nlls=nlls, token_mask=mask)

    def ar_losses(self, inputs, targets, mask):
        """Next-token losses at every position, projected in chunks; padding weighs 0."""
        weights = mask.reshape(-1).to(torch.float32)
        total, per_row = self._row_losses(inputs, None, None, obj.ar_rows,
                                          (targets.reshape(-1),), weights,
                                          (self.mask_index, MASK_LOGIT))
        return total, (per_row * weights).view(inputs.shape)
