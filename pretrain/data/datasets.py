"""The run config's datasets: which shards a run needs, building them when missing (rank 0
builds, the other ranks wait at a barrier) and opening them checked against the run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pretrain.data import shards as fmt
from pretrain.data.prepare import BuildSpec, block_size_for, build, shard_dir
from pretrain.data.sources import is_local, validation_split
from pretrain.data.tokenizers import get_tokenizer, vocab_hash


def tokenizer_for(cfg):
    return get_tokenizer(cfg.data.tokenizer_name_or_path, cfg.data.cache_dir)


def build_spec(cfg, kind: str) -> BuildSpec:
    """``kind`` is ``train`` or ``valid``."""
    dataset = cfg.data.train if kind == "train" else cfg.data.valid
    if kind == "train":
        split = "train"
    elif is_local(dataset):
        split = "validation"
    else:
        split = validation_split(dataset)
    shard_cfg = cfg.get("shards", {})
    return BuildSpec(
        dataset=str(dataset), split=split,
        tokenizer_name=str(cfg.data.tokenizer_name_or_path),
        block_size=block_size_for(str(dataset), split, cfg.model.length),
        wrap=bool(cfg.data.wrap), cache_dir=str(cfg.data.cache_dir),
        streaming=bool(cfg.data.get("streaming", False)) and kind == "train",
        docs_per_shard=int(shard_cfg.get("docs_per_shard", 50_000)),
        num_proc=int(shard_cfg.get("num_proc", 1)),
        wrap_group_docs=int(shard_cfg.get("wrap_group_docs", 1000)),
        wrap_group_procs=int(shard_cfg.get("wrap_group_procs", 1)),
        tokenize=str(shard_cfg.get("tokenize", "auto")),
        special=bool(cfg.data.get(f"insert_{kind}_special", True)),
        doc_eos=bool(cfg.data.get(f"insert_{kind}_eos", True)),
    )


def _dist():
    if sys.modules.get("torch") is None:  # never imported (the prepare command): no group
        return None
    try:
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() else None
    except ImportError:
        return None


def ensure_shards(spec: BuildSpec, tokenizer, progress: bool = True, encoder=None) -> Path:
    """The finished shard directory of ``spec``, built first if needed (with ``encoder``'s
    workers when given). Under torch.distributed, rank 0 builds while the others wait at a
    barrier."""
    if os.path.isfile(os.path.join(os.path.expanduser(spec.dataset), fmt.META)):
        return Path(os.path.expanduser(spec.dataset))  # a prepared shard directory
    dist = _dist()
    if dist is None:
        return build(spec, tokenizer, progress=progress, encoder=encoder)
    # Building OpenWebText takes hours, far past the default collective timeout: wait on a
    # group of our own with a long one.
    from datetime import timedelta

    waiting = dist.new_group(backend="gloo", timeout=timedelta(days=2))
    directory = None
    try:
        if dist.get_rank() == 0:
            directory = build(spec, tokenizer, progress=progress, encoder=encoder)
    finally:
        dist.barrier(group=waiting)
    dist.destroy_process_group(waiting)
    if directory is None:
        directory = shard_dir(spec, tokenizer)
        if not (directory / fmt.META).is_file():
            raise fmt.ShardError(f"rank 0 did not finish the shards in {directory}; see its "
                                 "error above.")
    return directory


def open_split(cfg, kind: str, tokenizer, progress: bool = True) -> fmt.ShardDataset:
    spec = build_spec(cfg, kind)
    directory = ensure_shards(spec, tokenizer, progress)
    expect = {"vocab_hash": vocab_hash(tokenizer), "vocab_size": len(tokenizer),
              "block_size": spec.block_size, "mode": "wrap" if spec.wrap else "pad",
              **spec.framing()}  # None in pad mode: not checked
    verify = bool(cfg.get("shards", {}).get("verify_checksums", True))
    return fmt.ShardDataset(directory, expect=expect, verify=verify)
