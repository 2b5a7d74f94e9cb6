"""Exponential moving average of the weights, in float32, correct under every ZeRO stage.

Decay warm-up as in the release: ``min(decay, (1 + n) / (10 + n))`` at the n-th update.
Under ZeRO-3 each rank keeps the average of its own partition of every parameter
(``param.ds_tensor``, the flat slice [rank * size, (rank + 1) * size) of the padded
parameter); otherwise every rank keeps the whole average and rank 0 saves it.
"""

from __future__ import annotations

import torch

from model.errors import CheckpointError


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this rank owns of ``p``: its ZeRO-3 partition, or the parameter itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _groups(sizes: list[int], float32: bool, budget: int = 1 << 26) -> list[tuple]:
    """[start, stop) index ranges of the parameters updated together: all at once for
    float32 weights (no copies), else about ``budget`` elements at a time."""
    if float32:
        return [(0, len(sizes))]
    groups, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if total and total + size > budget:
            groups.append((start, i))
            start, total = i, 0
        total += size
    groups.append((start, len(sizes)))
    return groups


class EMA:
    def __init__(self, named_parameters, decay: float):
        self.names, self.params = zip(*[(n, p) for n, p in named_parameters if p.requires_grad])
        self.decay = decay
        self.num_updates = 0
        self.partitioned = hasattr(self.params[0], "ds_tensor")
        self.shadow = [_local(p).detach().float().clone() for p in self.params]
        self._groups = _groups([s.numel() for s in self.shadow],
                               all(_local(p).dtype == torch.float32 for p in self.params))
        self._backup: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        # s <- s + (1 - decay)(p - s) in fused kernels; low-precision weights are widened a
        # group at a time, so no float32 copy of the whole model exists at once
        for start, stop in self._groups:
            torch._foreach_lerp_(self.shadow[start:stop],
                                 [_local(p).float() for p in self.params[start:stop]],
                                 1.0 - decay)

    def _refresh(self, engine) -> None:
        """ZeRO-3 keeps whole copies of some parameters besides the partitions: the
        persistent small ones, and any a no-grad forward left gathered. Release them and
        re-gather the persistent ones so every copy agrees with the partitions."""
        if not self.partitioned or engine is None:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        coordinator.release_and_reset_all(engine.module)
        held = [p for p in self.params if p.ds_status == ZeroParamStatus.AVAILABLE]
        if held:
            held[0].partition(held)
            held[0].all_gather(held)

    @torch.no_grad()
    def swap_in(self, engine=None) -> None:
        """Puts the averaged weights into the model (``swap_out`` restores the trained ones).
        Under ZeRO-3 pass the engine, whose gathered copies must follow."""
        self._refresh(engine)
        self._backup = [_local(p).detach().clone() for p in self.params]
        for s, p in zip(self.shadow, self.params):
            _local(p).copy_(s)
        self._refresh(engine)

    @torch.no_grad()
    def swap_out(self, engine=None) -> None:
        for b, p in zip(self._backup, self.params):
            _local(p).copy_(b)
        self._backup = None
        self._refresh(engine)

    def state_dict(self) -> dict:
        shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in self.params]
        return {"decay": self.decay, "num_updates": self.num_updates,
                "partitioned": self.partitioned, "names": list(self.names),
                "shapes": shapes, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != list(self.names) or len(state["shadow"]) != len(self.shadow):
            raise CheckpointError("the checkpoint's EMA holds other parameters than this model; "
                             "resume with the same model settings.")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for s, saved in zip(self.shadow, state["shadow"]):
            if saved.shape != s.shape:
                raise CheckpointError("the checkpoint's EMA partitions have other shapes than "
                                 "this run's (another ZeRO stage or world size?); resume with "
                                 "the same ones.")
            s.copy_(saved)
