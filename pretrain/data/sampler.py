"""A seeded, shuffled, rank-split sampler whose position is part of the checkpoint.

Every epoch draws one permutation of the dataset from ``seed + epoch`` and keeps the largest
prefix that is a whole number of global batches (``global_batch_size``, the samples of one
optimizer step across all ranks): **the last partial global batch is dropped**, so every
epoch is a whole number of optimizer steps and every rank sees the same number of samples.
Rank r takes positions r, r + world, r + 2 world, ... of that prefix, so no index appears
twice in an epoch.

The state is ``{"epoch", "consumed"}``: ``consumed`` counts the samples of this epoch that
all ranks together have used for optimizer steps. The training loop, not the iterator,
advances it (a DataLoader's workers run ahead of the steps), and resuming from it continues
the same order exactly, also with another world size that divides ``consumed``.
"""

from __future__ import annotations

import torch

from model.errors import UserError


class ResumableSampler(torch.utils.data.Sampler):
    def __init__(self, num_samples: int, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if global_batch_size % world_size:
            raise UserError(f"the global batch of {global_batch_size} samples does not split "
                             f"over {world_size} ranks; pick a multiple of the world size.")
        if num_samples < global_batch_size:
            raise UserError(f"the dataset has {num_samples} sequences, fewer than one global "
                             f"batch ({global_batch_size}); lower loader.global_batch_size or "
                             "use more data.")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.consumed = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def __len__(self) -> int:
        """Samples this rank yields in the rest of the current epoch."""
        kept = self.steps_per_epoch * self.global_batch_size
        return (kept - self.consumed) // self.world_size

    def _order(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        return perm[: self.steps_per_epoch * self.global_batch_size]

    def order(self, epoch: int) -> list[int]:
        """The kept global order of ``epoch`` (before the rank split)."""
        return self._order(epoch).tolist()

    def __iter__(self):
        mine = self._order(self.epoch)[self.consumed + self.rank::self.world_size]
        return iter(mine.tolist())

    def advance(self, samples: int) -> None:
        """Records ``samples`` (global) as used; rolls over to the next epoch at its end."""
        self.consumed += samples
        kept = self.steps_per_epoch * self.global_batch_size
        if self.consumed >= kept:
            self.epoch += 1
            self.consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise UserError(
                f"the checkpoint's sampler walked a dataset of {state['num_samples']} sequences "
                f"but this one has {self.num_samples}; resume with the same data and "
                "model.length, or start a new run directory."
            )
        if state["consumed"] % self.world_size:
            raise UserError(f"cannot resume {state['consumed']} consumed samples on "
                             f"{self.world_size} ranks; use a world size that divides it.")
        self.seed = state.get("seed", self.seed)
        self.epoch, self.consumed = state["epoch"], state["consumed"]
