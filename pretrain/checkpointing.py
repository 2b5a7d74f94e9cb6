"""Run checkpoints: DeepSpeed's sharded model/optimizer/scheduler states plus what makes a
resume exact, published atomically.

Layout under ``<save_dir>/checkpoints/``::

    step_000120/                 one DeepSpeed tag: its model/optimizer shards, plus
        rank_00000.pt ...        per rank: RNG states (python, numpy, torch) and the EMA
                                 (its partition under ZeRO-3; rank 0 only otherwise)
        run.json                 step, token and skip counters, sampler state, model config,
                                 ZeRO stage and world size, the resolved run config
    latest                       the tag of the newest complete checkpoint

``latest`` is written (temp file + rename) by rank 0 only after every rank has finished
writing its files, so a checkpoint interrupted half-way is never resumed from. The newest
``checkpointing.keep_last`` checkpoints are kept.

A resume reads every file (DeepSpeed's states included) strictly through the allowlist of
exactly the types these checkpoints hold (``model.checkpoint.safe.OURS``), so a tampered
file cannot run code; ``checkpointing.trust=True`` reads them fully.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import safe
from pretrain import distributed as D
from pretrain.data.shards import atomic_write_bytes, atomic_write_json

LATEST = "latest"
RUN_FILE = "run.json"
TRUST_FLAG = "checkpointing.trust=True"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(checkpoint_dir: Path) -> str | None:
    path = Path(checkpoint_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(checkpoint_dir) / tag / RUN_FILE).is_file() else None


def save(engine, checkpoint_dir: Path, step: int, run_state: dict, ema, keep_last: int) -> str:
    """Writes one checkpoint on every rank and publishes it; returns its tag."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
    rank = D.rank()
    per_rank = {"rng": rng_state()}
    if ema is not None and (ema.partitioned or rank == 0):
        per_rank["ema"] = ema.state_dict()
    tmp = checkpoint_dir / tag / f".rank_{rank:05d}.pt.tmp"
    torch.save(per_rank, tmp)
    os.replace(tmp, checkpoint_dir / tag / f"rank_{rank:05d}.pt")
    if rank == 0:
        atomic_write_json(checkpoint_dir / tag / RUN_FILE, run_state)
    D.barrier()  # every rank's files are complete
    if rank == 0:
        atomic_write_bytes(checkpoint_dir / LATEST, tag.encode())
        _prune(checkpoint_dir, keep_last, keep=tag)
    D.barrier()
    return tag


def _tags(checkpoint_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.iterdir()
                  if p.is_dir() and p.name.startswith("step_"))


def _prune(checkpoint_dir: Path, keep_last: int, keep: str) -> None:
    """Keeps the newest ``keep_last`` published checkpoints up to ``keep`` (just published)."""
    if keep_last <= 0:
        return
    published = [t for t in _tags(checkpoint_dir)
                 if t <= keep and (checkpoint_dir / t / RUN_FILE).is_file()]
    for tag in published[:-keep_last]:
        shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)


def discard_unpublished(checkpoint_dir: Path, latest: str) -> None:
    """Removes checkpoint directories newer than ``latest``: saves that were interrupted
    before they were published."""
    for tag in _tags(Path(checkpoint_dir)):
        if tag > latest:
            shutil.rmtree(Path(checkpoint_dir) / tag, ignore_errors=True)


def load(engine, checkpoint_dir: Path, tag: str, ema, trust: bool = False) -> dict:
    """Restores engine, EMA and this rank's RNG states; returns the run state. Files are
    read through the safe allowlist unless ``trust`` (``checkpointing.trust``)."""
    checkpoint_dir = Path(checkpoint_dir)
    run_state = json.loads((checkpoint_dir / tag / RUN_FILE).read_text())
    with safe.restricted_torch_load(safe.OURS, trust, TRUST_FLAG):
        load_path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag,
                                              load_module_strict=True,
                                              load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir / tag}.")
    rank = D.rank()
    own = checkpoint_dir / tag / f"rank_{rank:05d}.pt"
    per_rank = _read_rank_file(own if own.is_file() else checkpoint_dir / tag / "rank_00000.pt",
                               trust)
    if own.is_file():
        set_rng_state(per_rank["rng"])
    if ema is not None:
        source = per_rank if ema.partitioned else _read_rank_file(
            checkpoint_dir / tag / "rank_00000.pt", trust)
        ema.load_state_dict(source["ema"])
    return run_state


def _read_rank_file(path: Path, trust: bool) -> dict:
    """A rank file (RNG states, EMA), read through the safe allowlist unless ``trust``."""
    return safe.load(path, safe.OURS, trust=trust, flag=TRUST_FLAG)
