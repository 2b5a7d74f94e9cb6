"""Token shards on disk and the memory-mapped Dataset that reads them.

A shard directory holds flat token arrays ``shard_NNNNN.bin`` (uint16 when the vocabulary
fits, else uint32; one row of ``block_size`` tokens per sequence), in pad mode a
``shard_NNNNN.len`` array of real lengths (uint32) from which attention masks are rebuilt,
and ``meta.json``, written last: format version, dataset and split, tokenizer name and vocab
hash, vocab size, special ids, block size, mode, counts, and per-shard sizes and checksums.
A directory without ``meta.json`` is unfinished and is never read.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from model.errors import UserError

FORMAT_VERSION = 1
META = "meta.json"
VERIFIED = ".verified"


class ShardError(UserError):
    """Shards that are missing, damaged, or were built for another run."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AtomicFile:
    """A file written in pieces to a temporary name and checksummed on the way; ``commit``
    syncs it and renames it into place (returning its sha256), ``abort`` removes it. Until
    ``commit`` nothing at ``path`` changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        self.file = os.fdopen(fd, "wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def commit(self) -> str:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        self.tmp = None
        return self.digest.hexdigest()

    def abort(self) -> None:
        if self.tmp is not None:
            self.file.close()
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
            self.tmp = None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


FRAMED = "[BOS] ... [EOS]"  # meta.json's block_framing of wrap-mode rows framed as the release

def read_meta(directory: Path) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise ShardError(f"{directory} holds no finished shards ({META} is missing); build "
                         "them with `python -m pretrain.data.prepare` (same overrides).")
    with open(path) as f:
        return json.load(f)


class ShardDataset:
    """Map-style dataset over a shard directory: ``{'input_ids', 'attention_mask'}`` per
    sequence, read through numpy memmaps (nothing is loaded whole). Torch is imported on the
    first read, not with the module: building shards needs no torch.

    ``expect`` holds what the run needs (``vocab_hash``, ``vocab_size``, ``block_size``,
    ``mode``); any difference stops with one sentence naming it and the fix. Checksums are
    verified on the first open of a directory (then remembered) unless ``verify=False``.
    """

    def __init__(self, directory, expect: dict | None = None, verify: bool = True):
        self.directory = Path(directory)
        self.meta = meta = read_meta(self.directory)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ShardError(f"{self.directory} has shard format {meta.get('format_version')}, "
                             f"this code reads {FORMAT_VERSION}; rebuild the shards.")
        self._check_expected(expect or {})
        self.block_size = meta["block_size"]
        self.dtype = np.dtype(meta["dtype"])
        self.pad_mode = meta["mode"] == "pad"
        self._check_files(verify)
        self.counts = [s["sequences"] for s in meta["shards"]]
        self.offsets = np.cumsum([0] + self.counts).tolist()
        self._tokens: dict[int, np.memmap] = {}
        self._lengths: dict[int, np.memmap] = {}

    def _check_expected(self, expect: dict) -> None:
        split = "train" if self.meta.get("split") == "train" else "valid"
        fixes = {
            "vocab_hash": "the tokenizer (data.tokenizer_name_or_path)",
            "vocab_size": "the tokenizer's vocabulary size",
            "block_size": "model.length",
            "mode": "data.wrap",
            "block_framing": f"data.insert_{split}_special",
            "document_eos": f"data.insert_{split}_eos",
        }
        # wrap-mode shards built before the framing was recorded were framed, with EOS
        legacy = {"block_framing": FRAMED, "document_eos": True}
        for key, value in expect.items():
            have = self.meta.get(key, legacy.get(key) if self.meta.get("mode") == "wrap"
                                 else None)
            if value is not None and have != value:
                raise ShardError(
                    f"shards in {self.directory} were built with {key}={have!r} but this run "
                    f"has {key}={value!r} ({fixes.get(key, key)}); rebuild them with "
                    "`python -m pretrain.data.prepare` and this run's overrides, or point "
                    "data.cache_dir at shards built for it."
                )

    def _check_files(self, verify: bool) -> None:
        row_bytes = self.block_size * self.dtype.itemsize
        for shard in self.meta["shards"]:
            path = self.directory / shard["file"]
            if not path.is_file():
                raise ShardError(f"shard {path} is missing; rebuild the shards with "
                                 "`python -m pretrain.data.prepare`.")
            size = path.stat().st_size
            lengths = shard.get("lengths")
            if lengths is not None and (not (self.directory / lengths).is_file() or (
                    self.directory / lengths).stat().st_size != 4 * shard["sequences"]):
                raise ShardError(f"{self.directory / lengths} is missing or truncated; delete "
                                 f"{self.directory} and rebuild.")
            if size != shard["sequences"] * row_bytes or size != shard["bytes"]:
                raise ShardError(
                    f"shard {path} has {size} bytes but its metadata says "
                    f"{shard['bytes']} ({shard['sequences']} sequences of {self.block_size} "
                    f"{self.dtype.name} tokens): it is truncated or damaged; delete "
                    f"{self.directory} and rebuild."
                )
        stamp = self.directory / VERIFIED
        digest = hashlib.sha256(json.dumps(self.meta, sort_keys=True).encode()).hexdigest()
        if not verify or (stamp.is_file() and stamp.read_text().strip() == digest):
            return
        for shard in self.meta["shards"]:
            for key, name in (("sha256", shard["file"]), ("lengths_sha256", shard.get("lengths"))):
                if name is None:
                    continue
                path = self.directory / name
                if sha256_file(path) != shard[key]:
                    raise ShardError(f"shard {path} fails its checksum: it is damaged; delete "
                                     f"{self.directory} and rebuild.")
        try:
            atomic_write_bytes(stamp, digest.encode())
        except OSError:  # a read-only cache: verify again next time
            pass

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, k: int) -> np.memmap:
        if k not in self._tokens:
            shard = self.meta["shards"][k]
            self._tokens[k] = np.memmap(self.directory / shard["file"], dtype=self.dtype,
                                        mode="r", shape=(shard["sequences"], self.block_size))
            if self.pad_mode:
                self._lengths[k] = np.memmap(self.directory / shard["lengths"], dtype=np.uint32,
                                             mode="r", shape=(shard["sequences"],))
        return self._tokens[k]

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        import torch

        k = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[k]
        ids = torch.from_numpy(self._shard(k)[row].astype(np.int64))
        if self.pad_mode:
            length = int(self._lengths[k][row])
            mask = (torch.arange(self.block_size) < length).long()
        else:
            mask = torch.ones(self.block_size, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}

    def __getstate__(self):  # memmaps are reopened in DataLoader workers
        state = dict(self.__dict__)
        state["_tokens"], state["_lengths"] = {}, {}
        return state
