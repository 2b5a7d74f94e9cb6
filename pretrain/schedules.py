"""Learning-rate schedules of the release, as multipliers of ``optim.lr`` per optimizer step."""

from __future__ import annotations

import math

import torch

from model.errors import UserError


def lr_lambda(cfg, max_steps: int):
    """``constant_warmup``: linear warm-up over ``num_warmup_steps`` then constant
    (transformers' get_constant_schedule_with_warmup). ``cosine_decay_warmup``: linear
    warm-up from ``warmup_lr_init`` over ``warmup_t`` steps, then cosine decay to ``lr_min``
    over ``t_initial`` steps (timm's CosineLRScheduler with warmup_prefix, per step)."""
    sched = cfg.lr_scheduler
    name = sched.get("name", "constant_warmup")
    base = float(cfg.optim.lr)
    if name == "constant_warmup":
        warmup = int(sched.num_warmup_steps)
        return lambda step: min(1.0, step / warmup) if warmup > 0 else 1.0
    if name == "cosine_decay_warmup":
        warmup_t, t_initial = int(sched.warmup_t), int(sched.t_initial)
        lr_init, lr_min = float(sched.warmup_lr_init), float(sched.lr_min)

        def factor(step: int) -> float:
            if step < warmup_t:
                lr = lr_init + step * (base - lr_init) / warmup_t
            else:
                t = min(step - warmup_t, t_initial)
                cosine = math.cos(math.pi * t / max(t_initial, 1))
                lr = lr_min + 0.5 * (base - lr_min) * (1 + cosine)
            return lr / base

        return factor
    raise UserError(f"lr_scheduler={name} is not known; use constant_warmup or "
                     "cosine_decay_warmup.")


def build(optimizer, cfg, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))
