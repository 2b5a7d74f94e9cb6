"""Run checkpoints: DeepSpeed's sharded model/optimizer/scheduler states plus what makes a
resume exact, published atomically.

Layout under ``<save_dir>/checkpoints/``::

    step_000120/                 one DeepSpeed tag: its model/optimizer shards, plus
        rank_00000.pt ...        per rank: RNG states (python, numpy, torch) and the EMA
                                 (its partition under ZeRO-3; rank 0 only otherwise)
        run.json                 step, token and skip counters, sampler state, model config,
                                 ZeRO stage and world size, the resolved run config
        manifest.json            every file of the tag and its size, as published
    latest                       the tag of the newest complete checkpoint

``latest`` is written (temp file + rename) by rank 0 only after every rank has finished
writing its files and the manifest records them, so a checkpoint interrupted half-way is
never resumed from. The newest ``checkpointing.keep_last`` checkpoints are kept.

A save that fails on any rank (a full disk, an I/O error) stops the run with one sentence;
``latest`` and the checkpoints before it are untouched, since nothing of an earlier tag is
ever written again. A resume checks the tag against its manifest first (every file there,
each of its published size): a damaged tag is set aside as ``damaged_<tag>`` with a
warning naming what is wrong, and the run resumes from the previous published tag. Partial
state is never loaded.

A resume reads every file (DeepSpeed's states included) strictly through the allowlist of
exactly the types these checkpoints hold (``model.checkpoint.safe.OURS``), so a tampered
file cannot run code; ``checkpointing.trust=True`` reads them fully.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import safe
from model.errors import CheckpointError, UserError
from pretrain import distributed as D
from pretrain.data.shards import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)
LATEST = "latest"
RUN_FILE = "run.json"
MANIFEST = "manifest.json"
DAMAGED = "damaged_"
TRUST_FLAG = "checkpointing.trust=True"


class SaveError(UserError):
    """A checkpoint that could not be written (full disk, I/O error)."""


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
    """Writes one checkpoint on every rank and publishes it; returns its tag. A failed write
    raises ``SaveError`` on its rank, whose exit stops the others (``pretrain.watchdog``)
    before anything is published."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag_for(step)
    rank = D.rank()
    previous = None
    if rank == 0:  # one view of the directory for every rank
        previous = latest_tag(checkpoint_dir)
        if previous != tag and (checkpoint_dir / tag).exists():
            shutil.rmtree(checkpoint_dir / tag)  # the remains of a save that never published
    previous = D.broadcast(previous)
    if previous == tag:
        return tag  # published already: a published checkpoint is never written again
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
        per_rank = {"rng": rng_state()}
        if ema is not None and (ema.partitioned or rank == 0):
            per_rank["ema"] = ema.state_dict()
        tmp = checkpoint_dir / tag / f".rank_{rank:05d}.pt.tmp"
        torch.save(per_rank, tmp)
        os.replace(tmp, checkpoint_dir / tag / f"rank_{rank:05d}.pt")
    except (OSError, RuntimeError) as err:
        raise _save_failed(err, tag, checkpoint_dir, previous) from None
    sizes = D.gather_lists([file_sizes(checkpoint_dir / tag)])  # every rank's files written
    if rank == 0:
        files: dict[str, int] = {}
        for seen in sizes:  # a rank may see another's file before it is whole: the writer's
            for name, size in seen.items():  # view, the largest, is the file's size
                files[name] = max(size, files.get(name, 0))
        try:
            atomic_write_json(checkpoint_dir / tag / RUN_FILE, run_state)
            atomic_write_json(checkpoint_dir / tag / MANIFEST,
                              {"tag": tag, "world_size": D.world_size(), "files": files})
            atomic_write_bytes(checkpoint_dir / LATEST, tag.encode())
        except (OSError, RuntimeError) as err:
            raise _save_failed(err, tag, checkpoint_dir, previous) from None
        _prune(checkpoint_dir, keep_last, keep=tag)
    D.barrier()
    return tag


def _save_failed(err: Exception, tag: str, checkpoint_dir: Path, previous: str | None):
    """The one sentence of a failed save, or ``err`` itself when it is no I/O failure."""
    if isinstance(err, RuntimeError) and "writ" not in str(err).lower():
        return err  # not a write that failed: a bug, which keeps its traceback
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    kept = (f"{LATEST} still names {previous}, which is untouched" if previous else
            "no earlier checkpoint was published")
    return SaveError(f"saving checkpoint {tag} in {checkpoint_dir} failed on rank {D.rank()} "
                     f"({reason}); {kept}: free space or fix the disk, then start the run "
                     "again to resume.")


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """Every finished file under ``tag_dir`` (temp files left out) and its size."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST}


def problem(tag_dir: Path) -> str | None:
    """What is wrong with a published tag, against its manifest; None when it is whole.
    A tag from before manifests is checked for its run state only."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        return None if (tag_dir / RUN_FILE).is_file() else f"{RUN_FILE} is missing"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, size in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was published"
    return None


def resume_tag(checkpoint_dir: Path) -> str | None:
    """The newest published tag that is whole (rank 0 decides; every rank gets it), or None
    when nothing was published. Damaged tags newer than it are set aside with a warning and
    ``latest`` names it; when every published tag is damaged the run stops."""
    checkpoint_dir = Path(checkpoint_dir)
    answer = None
    if D.rank() == 0:
        answer = _choose(checkpoint_dir)
    answer = D.broadcast(answer)
    if isinstance(answer, str) and answer.startswith("error:"):
        raise CheckpointError(answer[len("error:"):])
    return answer


def _choose(checkpoint_dir: Path) -> str | None:
    latest_path = checkpoint_dir / LATEST
    if not latest_path.is_file():
        return None
    latest = latest_path.read_text().strip()
    candidates = [t for t in reversed(_tags(checkpoint_dir)) if t <= latest and (
        (checkpoint_dir / t / MANIFEST).is_file() or (checkpoint_dir / t / RUN_FILE).is_file())]
    if latest not in candidates:
        candidates.insert(0, latest)  # named but gone or empty: reported as damaged
    damaged = []
    for tag in candidates:
        what = problem(checkpoint_dir / tag) if (checkpoint_dir / tag).is_dir() else (
            "its directory is missing")
        if what is None:
            for bad, _ in damaged:
                _set_aside(checkpoint_dir, bad)
            if tag != latest:
                atomic_write_bytes(latest_path, tag.encode())
            return tag
        damaged.append((tag, what))
        following = "; trying the one before it" if tag != candidates[-1] else ""
        log.warning("checkpoint %s is damaged (%s)%s.", checkpoint_dir / tag, what, following)
    listed = "; ".join(f"{t}: {w}" for t, w in damaged)
    return (f"error:every published checkpoint in {checkpoint_dir} is damaged ({listed}); "
            "restore its files, or start afresh with another checkpointing.save_dir or "
            "checkpointing.resume_from_ckpt=False.")


def _set_aside(checkpoint_dir: Path, tag: str) -> None:
    """Renames a damaged tag out of the way (kept for inspection, never resumed from)."""
    source = checkpoint_dir / tag
    if not source.exists():
        return
    target = _unused(checkpoint_dir / f"{DAMAGED}{tag}")
    os.replace(source, target)
    log.warning("set the damaged checkpoint %s aside as %s.", source, target.name)


def set_aside_for_a_new_run(checkpoint_dir: Path) -> Path | None:
    """A run that does not resume (``checkpointing.resume_from_ckpt=False``) in a directory
    holding another run's checkpoints moves them aside (``checkpoints.replaced-<time>``)
    rather than mixing its checkpoints with theirs; returns where they went."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir() or not any(checkpoint_dir.iterdir()):
        return None
    import time

    target = _unused(checkpoint_dir.with_name(
        f"{checkpoint_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.replace(checkpoint_dir, target)
    return target


def _unused(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2`` ... when it is taken."""
    target, n = path, 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.{n}"), n + 1
    return target


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
