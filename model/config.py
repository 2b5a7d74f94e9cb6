"""The settings that define a model and its training objective, checked once at construction."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from model.errors import ConfigError

BACKBONES = ("dit", "ar")
PARAMETERIZATIONS = ("subs", "d3pm", "sedd", "ar", "bd3lm")
ATTN_BACKENDS = ("auto", "sdpa", "flash", "flex")
AUTOCAST = ("auto", "bf16", "fp16", "off")
LOSS_PATHS = ("masked", "full")

# Architectures of the model config group (hidden size, blocks, heads, conditioning width).
ARCHITECTURES = {
    "tiny": dict(hidden_size=512, cond_dim=128, n_blocks=8, n_heads=8),
    "small": dict(hidden_size=768, cond_dim=128, n_blocks=12, n_heads=12),
    "medium": dict(hidden_size=1024, cond_dim=128, n_blocks=24, n_heads=16),
}


@dataclass
class ModelConfig:
    """Architecture, vocabulary and objective of one model.

    ``backbone`` picks the network (``dit``: bidirectional DiT with adaLN time conditioning;
    ``ar``: causal transformer) and ``parameterization`` the objective (``subs``, ``d3pm``,
    ``sedd`` or ``ar``). ``T = 0`` is continuous time; ``T > 0`` the discrete-time bound.
    """

    backbone: str = "dit"
    parameterization: str = "subs"
    vocab_size: int = 50258
    mask_index: int = 50257
    length: int = 1024
    hidden_size: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    time_conditioning: bool = False
    T: int = 0
    subs_masking: bool = False
    noise: dict = field(default_factory=lambda: {"type": "loglinear", "eps": 1e-3})
    antithetic_sampling: bool = True
    importance_sampling: bool = False
    change_of_variables: bool = False
    sampling_eps: float = 1e-3
    bos_index: int | None = None
    eos_index: int | None = None
    attn_backend: str = "auto"
    autocast: str = "auto"
    # torch.compile of the blocks and of the training cross entropy: True, False, or "auto"
    # (compiled for training on CUDA, where model=small ran at 1.79x the eager tokens/s on an
    # H200; eager on the CPU and outside training)
    compile: bool | str = False
    # "masked": the output projection and loss run only where the loss can be nonzero, in
    # chunks of loss_chunk_rows rows (0: by device and vocabulary, model.projection); "full":
    # every position's logits at once (the release's computation, kept for comparison)
    loss_path: str = "masked"
    loss_chunk_rows: int = 0
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # block diffusion (parameterization=bd3lm, model.block_diffusion): blocks of block_size
    # tokens (0: the whole length, which is MDLM), each block's t clipped to
    # [sampling_eps_min, sampling_eps_max] (masked shares outside redrawn with resample),
    # the first token kept clean and unscored with ignore_bos
    block_size: int = 0
    sampling_eps_min: float = 1e-3
    sampling_eps_max: float = 1.0
    resample: bool = False
    ignore_bos: bool = False

    def __post_init__(self):
        self.noise = dict(self.noise)
        self.validate()

    @property
    def blocks(self) -> int:
        """The block size of block diffusion (the length when ``block_size`` is 0)."""
        return self.block_size or self.length

    @property
    def is_diffusion(self) -> bool:
        return self.parameterization != "ar"

    def replace(self, **changes: Any) -> ModelConfig:
        check_field_names(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        need(self.backbone in BACKBONES,
             f"backbone={self.backbone!r} is not known; use one of {list(BACKBONES)}.")
        need(self.parameterization in PARAMETERIZATIONS,
             f"parameterization={self.parameterization!r} is not known; "
             f"use one of {list(PARAMETERIZATIONS)}.")
        need((self.backbone == "ar") == (self.parameterization == "ar"),
             f"backbone={self.backbone} cannot be trained with "
             f"parameterization={self.parameterization}; the autoregressive baseline needs "
             "backbone=ar parameterization=ar (and the diffusion objectives backbone=dit).")
        need(self.compile is True or self.compile is False or self.compile == "auto",
             f"model.compile={self.compile!r} is not one of True, False, auto.")
        need(self.attn_backend in ATTN_BACKENDS,
             f"model.attn_backend={self.attn_backend!r} is not known; "
             f"use one of {list(ATTN_BACKENDS)}.")
        need(self.autocast in AUTOCAST,
             f"model.autocast={self.autocast!r} is not known; use one of {list(AUTOCAST)}.")
        need(self.loss_path in LOSS_PATHS,
             f"model.loss_path={self.loss_path!r} is not known; use one of {list(LOSS_PATHS)}.")
        need(self.loss_chunk_rows >= 0,
             f"model.loss_chunk_rows={self.loss_chunk_rows} must be 0 (chosen by device) or "
             "the number of rows of logits scored at once.")
        for key in ("length", "hidden_size", "n_heads", "n_blocks", "cond_dim"):
            value = getattr(self, key)
            need(isinstance(value, int) and value >= 1,
                 f"model.{key}={value} must be a positive whole number.")
        need(self.hidden_size % self.n_heads == 0,
             f"model.hidden_size={self.hidden_size} is not divisible by "
             f"model.n_heads={self.n_heads}; pick a head count that divides it.")
        need((self.hidden_size // self.n_heads) % 2 == 0,
             f"the head size {self.hidden_size // self.n_heads} (hidden_size / n_heads) must be "
             "even for rotary embeddings; change model.hidden_size or model.n_heads.")
        need(0 <= self.mask_index < self.vocab_size,
             f"mask index {self.mask_index} is outside the vocabulary of size "
             f"{self.vocab_size}; the vocabulary must include the [MASK] token.")
        need(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must lie in [0, 1).")
        need(self.T >= 0, f"T={self.T} must be 0 (continuous time) or a positive step count.")
        need(0.0 < self.sampling_eps < 1.0,
             f"training.sampling_eps={self.sampling_eps} must lie in (0, 1).")
        need(not (self.change_of_variables and self.importance_sampling),
             "training.change_of_variables and training.importance_sampling cannot both be "
             "on; turn one of them off.")
        if self.parameterization == "bd3lm":
            need(self.block_size >= 0 and self.length % self.blocks == 0,
                 f"model.block_size={self.block_size} must divide model.length={self.length} "
                 "(0: one block of the whole length).")
            need(0.0 < self.sampling_eps_min <= self.sampling_eps_max <= 1.0,
                 f"training.sampling_eps_min={self.sampling_eps_min} and "
                 f"training.sampling_eps_max={self.sampling_eps_max} must satisfy "
                 "0 < min <= max <= 1.")
            need(self.T == 0 and not self.importance_sampling and not self.change_of_variables
                 and not self.time_conditioning,
                 "parameterization=bd3lm trains in continuous time without time "
                 "conditioning; set T=0, time_conditioning=False, "
                 "training.importance_sampling=False and training.change_of_variables=False.")
        if self.parameterization == "sedd":
            need(not self.importance_sampling and not self.change_of_variables,
                 "parameterization=sedd supports neither training.importance_sampling nor "
                 "training.change_of_variables; set both to False.")
            need(self.time_conditioning,
                 "parameterization=sedd needs time_conditioning=True (its log score divides "
                 "by exp(sigma) - 1, which is 0 when sigma is withheld).")
        if self.parameterization == "d3pm":
            need(self.T > 0, "parameterization=d3pm is a discrete-time objective; set T>0 "
                             "(e.g. T=1000).")
        if self.T > 0:
            need(self.parameterization in ("subs", "d3pm"),
                 f"T={self.T} (discrete time) is only defined for parameterization=subs or "
                 f"d3pm, not {self.parameterization}; set T=0.")
        if self.subs_masking:
            need(self.parameterization == "d3pm",
                 "subs_masking=True only applies to parameterization=d3pm (SUBS already "
                 "masks the [MASK] logit); set subs_masking=False.")
        if self.is_diffusion:
            from model.noise import get_noise

            schedule = get_noise(self.noise)
            if self.importance_sampling or self.change_of_variables:
                need(schedule.supports_importance_sampling,
                     f"training.importance_sampling/change_of_variables need noise=loglinear "
                     f"or noise=linear, not noise={schedule.name}.")
            if self.T > 0:
                need(schedule.name == "loglinear",
                     f"the discrete-time bound (T={self.T}) assumes alpha_t = 1 - t, which "
                     f"holds for noise=loglinear only, not noise={schedule.name}.")


def check_field_names(values: dict) -> None:
    """Refuses unknown ModelConfig field names, suggesting the closest valid one."""
    known = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid names: {known}."
            raise ConfigError(f"{key!r} is not a model setting{hint}")


# run config ``backbone`` -> network (hf_dit: the DiT, loaded from eval.checkpoint_path)
RUN_BACKBONES = {"dit": "dit", "hf_dit": "dit", "ar": "ar"}


def from_run_config(cfg, vocab_size: int, mask_index: int, **extra) -> ModelConfig:
    """Builds a ModelConfig from the Hydra run config (release key names).

    ``vocab_size``, ``mask_index`` (and ``bos_index``/``eos_index`` in ``extra``) come from
    the tokenizer: see ``model.vocab.tokenizer_ids``.
    """
    m = cfg.model
    training = cfg.get("training", {})
    noise = dict(cfg.get("noise", {"type": "loglinear"}))
    if cfg.backbone not in RUN_BACKBONES:
        raise ConfigError(f"backbone={cfg.backbone} is not supported; use one of "
                          f"{sorted(RUN_BACKBONES)}.")
    values = dict(
        backbone=RUN_BACKBONES[cfg.backbone],
        parameterization=cfg.parameterization,
        vocab_size=vocab_size,
        mask_index=mask_index,
        length=m.length,
        hidden_size=m.hidden_size,
        cond_dim=m.cond_dim,
        n_blocks=m.n_blocks,
        n_heads=m.n_heads,
        dropout=m.dropout,
        time_conditioning=cfg.time_conditioning,
        T=cfg.T,
        subs_masking=cfg.subs_masking,
        noise=noise,
        antithetic_sampling=training.get("antithetic_sampling", True),
        importance_sampling=training.get("importance_sampling", False),
        change_of_variables=training.get("change_of_variables", False),
        sampling_eps=training.get("sampling_eps", 1e-3),
        attn_backend=m.get("attn_backend", "auto"),
        autocast=m.get("autocast", "auto"),
        compile=m.get("compile", False),
        loss_path=m.get("loss_path", "masked"),
        loss_chunk_rows=m.get("loss_chunk_rows", 0),
        activation_checkpointing=m.get("activation_checkpointing", False),
        block_size=int(cfg.get("block_size") or 0),
        sampling_eps_min=training.get("sampling_eps_min", 1e-3),
        sampling_eps_max=training.get("sampling_eps_max", 1.0),
        resample=training.get("resample", False),
        ignore_bos=cfg.get("ignore_bos", False),
    )
    values.update(extra)
    return ModelConfig(**values)
