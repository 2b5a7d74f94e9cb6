"""Raw text -> token shards, in parallel, resumably and atomically.

``python -m pretrain.data.prepare <overrides>`` builds the shards of ``data.train`` and
``data.valid`` for the run config's tokenizer and ``model.length`` under ``data.cache_dir``;
training and evaluation call the same code when shards are missing.

Documents stream from the source in fixed groups of ``shards.docs_per_shard``; each group
becomes one shard, written as its rows arrive (memory holds a few batches of documents, not
a shard or a split). One ``Encoder`` (``encode.py``) tokenizes for every split of a build,
on the fast tokenizer's own threads or in worker processes started once. Wrap mode appends
EOS to every document and, as the release's ``map(group_texts, batched=True, num_proc=P)``
does, concatenates each *wrap group* of
``shards.wrap_group_docs`` consecutive documents (1000, the release's map batch), cuts it
into ``block_size - 2`` tokens framed as [BOS] chunk [EOS] and drops the group's incomplete
tail. With ``shards.wrap_group_procs=P`` the split is first cut into P contiguous parts as
``datasets`` does for P processes, each grouped from its own start, which reproduces a
cache the release built with ``num_proc=P``; ``shards.wrap_group_docs=0`` concatenates the
whole split (one tail dropped). The BD3-LM release's ``data.insert_{train,valid}_special=False``
cuts plain ``block_size`` rows instead of framing them, and
``data.insert_{train,valid}_eos=False`` appends no EOS to the documents (wrap mode only, as
there). Pad mode tokenizes each document with its special tokens,
truncated and padded to ``block_size``. After each shard, ``progress.json`` records what is
finished (and the tokens carried into the next shard), so a rerun skips finished shards and
produces byte-identical files; ``meta.json``, written last, marks the directory complete.
A mistake in the data (a missing, empty or malformed file) is a ``DataError``: the command
prints it as one line and exits 2. The command does not import torch, which tokenizing does
not need, unless a tokenizer cannot load without it (``encode.torch_hidden``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pretrain.data import shards as fmt
from pretrain.data.encode import WITH_TORCH, Encoder, framing_ids, torch_hidden
from pretrain.data.sources import DataError, open_source

PROGRESS = "progress.json"


def vocab_hash(tokenizer) -> str:
    """``pretrain.data.tokenizers.vocab_hash``, imported when first needed: importing this
    module imports neither transformers nor torch (see ``encode.torch_hidden``)."""
    from pretrain.data.tokenizers import vocab_hash as digest

    return digest(tokenizer)


@dataclass(frozen=True)
class BuildSpec:
    dataset: str  # a recipe name, "builtin" or a local path
    split: str  # "train", "validation" or "test"
    tokenizer_name: str
    block_size: int
    wrap: bool
    cache_dir: str
    streaming: bool = False
    docs_per_shard: int = 50_000
    num_proc: int = 1
    batch_docs: int = 256  # documents per tokenizing job: bounds the memory in flight
    wrap_group_docs: int = 1_000  # 0: the whole split is one group
    wrap_group_procs: int = 1
    tokenize: str = "auto"  # where tokenizing runs (pretrain.data.encode); bytes are the same
    special: bool = True  # wrap: [BOS] ... [EOS] around each block (data.insert_*_special)
    doc_eos: bool = True  # wrap: EOS after each document (data.insert_*_eos)

    def changed_framing(self) -> dict:
        """The framing settings that differ from the default (wrap mode only): part of the
        directory name and the build's parameters only then, so that shards built before
        these settings existed keep their names and resume."""
        if not self.wrap:
            return {}
        return {k: v for k, v in (("special", self.special), ("doc_eos", self.doc_eos))
                if not v}

    def framing(self) -> dict:
        """``meta.json``'s record of the framing (None in pad mode), which runs opening the
        shards expect to match."""
        if not self.wrap:
            return {"block_framing": None, "document_eos": None}
        return {"block_framing": fmt.FRAMED if self.special else "none",
                "document_eos": self.doc_eos}


def block_size_for(dataset: str, split: str, length: int) -> int:
    """Blocks are twice model.length for text8-crop training (the model crops them)."""
    return 2 * length if dataset == "text8-crop" and split == "train" else length


def shard_dir(spec: BuildSpec, tokenizer) -> Path:
    name = str(spec.dataset)
    if os.path.exists(os.path.expanduser(name)):
        absolute = os.path.abspath(os.path.expanduser(name))
        name = f"{Path(absolute).name}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}"
    mode = "wrap" if spec.wrap else "pad"
    if spec.wrap and spec.wrap_group_docs:
        mode += f"{spec.wrap_group_docs}" + (f"x{spec.wrap_group_procs}"
                                              if spec.wrap_group_procs > 1 else "")
    changed = spec.changed_framing()
    mode += "-unframed" if "special" in changed else ""
    mode += "-noeos" if "doc_eos" in changed else ""
    root = Path(os.path.expanduser(spec.cache_dir))
    return root / f"{name}-{spec.split}-L{spec.block_size}-{mode}-{vocab_hash(tokenizer)}"


# ----------------------------------------------------------------------------- building
class WrapGroups:
    """Where the wrap groups of a split end (document indices, exclusive)."""

    def __init__(self, group_docs: int, procs: int, num_docs: int | None, name: str):
        if group_docs < 0 or procs < 1:
            raise DataError(f"shards.wrap_group_docs={group_docs} must be >= 0 and "
                            f"shards.wrap_group_procs={procs} >= 1.")
        if procs > 1 and num_docs is None:
            raise DataError(f"shards.wrap_group_procs={procs} needs the number of documents "
                            f"of {name}, which a streamed dataset does not know; set "
                            "data.streaming=False or shards.wrap_group_procs=1.")
        self.group_docs = group_docs
        self.starts = [0]
        if procs > 1:
            procs = min(procs, max(num_docs, 1))  # as datasets does for tiny datasets
            div, mod = divmod(num_docs, procs)
            self.starts = [div * k + min(k, mod) for k in range(procs)]

    def next_end(self, i: int) -> int | None:
        """The end of the group holding document ``i``; None when the split is one group."""
        if not self.group_docs:
            return None
        part = max(k for k, s in enumerate(self.starts) if s <= i)
        start = self.starts[part]
        end = start + ((i - start) // self.group_docs + 1) * self.group_docs
        if part + 1 < len(self.starts):
            end = min(end, self.starts[part + 1])
        return end


def _shard_jobs(texts, start: int, docs_per_shard: int, groups: WrapGroups | None,
                batch_docs: int):
    """The next shard's documents, read from ``texts`` (document ``start`` on), as
    ``(batch, ends_group)`` jobs of at most ``batch_docs``, every wrap group ending at the end
    of a job; stops early when the documents run out."""
    offset = 0
    while offset < docs_per_shard:
        size = min(batch_docs, docs_per_shard - offset)
        end = groups.next_end(start + offset) if groups is not None else None
        ends_group = end is not None and end - start - offset <= size
        if ends_group:
            size = end - start - offset
        batch = list(itertools.islice(texts, size))
        if not batch:
            return
        yield batch, ends_group and len(batch) == size
        if len(batch) < size:
            return
        offset += size


def _frame(stream: np.ndarray, block_size: int, bos: int | None, eos: int | None):
    """Cuts a token stream into [BOS] + (block_size - 2 tokens) + [EOS] rows (plain rows of
    ``block_size`` tokens when ``bos`` and ``eos`` are None); returns the rows and the uncut
    remainder."""
    if bos is None:
        n = len(stream) // block_size
        return stream[: n * block_size].reshape(n, block_size), stream[n * block_size:]
    body = block_size - 2
    n = len(stream) // body
    rows = np.empty((n, block_size), dtype=np.int64)
    rows[:, 0] = bos
    rows[:, 1:-1] = stream[: n * body].reshape(n, body)
    rows[:, -1] = eos
    return rows, stream[n * body:]


def build(spec: BuildSpec, tokenizer, progress: bool = True, stop_after=None,
          encoder: Encoder | None = None) -> Path:
    """Builds (or finishes) the shards of ``spec``; returns their directory.

    ``encoder`` is the build's tokenizing workers, shared by all its splits (one is started
    here, and closed, when none is given). ``stop_after`` (tests only) stops after that many
    new shards, as a killed run would.
    """
    directory = shard_dir(spec, tokenizer)
    if (directory / fmt.META).is_file():
        return directory
    if encoder is None:
        with Encoder(tokenizer, spec.num_proc, spec.tokenize) as encoder:
            return build(spec, tokenizer, progress, stop_after, encoder)
    from tqdm import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    # what decides the shards' bytes (not how many cores or which way made them)
    params = {k: v for k, v in asdict(spec).items() if k not in ("special", "doc_eos")}
    params |= spec.changed_framing() | {"num_proc": None, "tokenize": None,
                                        "vocab_hash": vocab_hash(tokenizer)}
    state = {"params": params, "docs_done": 0, "carry": [], "shards": []}
    if (directory / PROGRESS).is_file():
        saved = json.loads((directory / PROGRESS).read_text())
        if saved.get("params") == params:
            state = saved

    dtype = fmt.token_dtype(len(tokenizer))
    bos, eos = framing_ids(tokenizer)
    source = open_source(spec.dataset, spec.split, spec.cache_dir, spec.streaming,
                         spec.block_size)
    groups = (WrapGroups(spec.wrap_group_docs, spec.wrap_group_procs,
                         source.num_docs if spec.wrap_group_procs > 1 else None,
                         spec.dataset) if spec.wrap else None)
    texts = source.texts(state["docs_done"])
    bar = tqdm(total=source.known_docs, initial=state["docs_done"], unit="doc",
               disable=not progress, desc=f"{spec.dataset}:{spec.split}")
    started, new_tokens, new_shards = time.perf_counter(), 0, 0
    try:
        while True:
            jobs = ((batch, spec.wrap, spec.block_size, ends_group) for batch, ends_group in
                    _shard_jobs(texts, state["docs_done"], spec.docs_per_shard, groups,
                                spec.batch_docs))
            shard = _ShardOut(directory, len(state["shards"]), dtype, spec.wrap,
                              spec.block_size)
            try:
                carry, docs, tokens = _encode_shard(encoder.map(jobs), shard, state, bos, eos,
                                                    spec.block_size, spec.special,
                                                    spec.doc_eos)
                if docs == 0:
                    break
                entry = shard.finish()
            finally:
                shard.abort()
            if entry is not None:
                state["shards"].append(entry)
            state["docs_done"] += docs
            state["carry"] = carry.tolist() if spec.wrap else []
            fmt.atomic_write_json(directory / PROGRESS, state)
            new_tokens += tokens
            new_shards += 1
            bar.update(docs)
            bar.set_postfix(tokens_per_s=f"{new_tokens / (time.perf_counter() - started):,.0f}")
            if stop_after is not None and new_shards >= stop_after:
                return directory
    finally:
        bar.close()

    if state["docs_done"] == 0:
        raise DataError(f"{spec.dataset} ({spec.split}) holds no documents; point data.train "
                        "/ data.valid at a file or dataset with text in it.")
    if not state["shards"]:
        raise DataError(
            f"{spec.dataset} ({spec.split}) gave no complete block of {spec.block_size} "
            "tokens; use a larger corpus or a smaller model.length."
        )
    fmt.atomic_write_json(directory / fmt.META, _meta(spec, tokenizer, state, bos, eos, dtype))
    (directory / PROGRESS).unlink(missing_ok=True)
    return directory


def _encode_shard(results, shard: _ShardOut, state: dict, bos: int, eos: int,
                  block_size: int, special: bool = True, doc_eos: bool = True):
    """Frames (wrap) or copies (pad) each encoded batch into ``shard`` as it arrives;
    returns the carry into the next shard, the documents and the tokens of this one."""
    carry = np.asarray(state["carry"], dtype=np.int64)
    docs = tokens = 0
    for (ids, lengths), ends_group in results:
        if shard.wrap and not doc_eos:  # each document's ids end with the EOS appended
            ids = np.delete(ids, np.cumsum(lengths) - 1)
            lengths = lengths - 1
        docs += len(lengths)
        tokens += int(lengths.sum())
        if shard.wrap:
            rows, carry = _frame(np.concatenate([carry, ids]), block_size,
                                 *((bos, eos) if special else (None, None)))
            if ends_group:
                carry = carry[:0]  # the group's incomplete tail is dropped
            shard.write(rows)
        else:
            shard.write(ids, lengths)
    return carry, docs, tokens


class _ShardOut:
    """One shard written as its rows arrive: to a temporary file, checksummed on the way,
    renamed into place by ``finish`` (an empty shard leaves no file)."""

    def __init__(self, directory: Path, index: int, dtype, wrap: bool, block_size: int):
        self.directory, self.dtype, self.wrap = directory, dtype, wrap
        self.block_size = block_size
        self.name = f"shard_{index:05d}.bin"
        self.file = fmt.AtomicFile(directory / self.name)
        self.sequences, self.lengths = 0, []

    def write(self, rows: np.ndarray, lengths: np.ndarray | None = None) -> None:
        self.file.write(rows.astype(self.dtype).tobytes())
        self.sequences += len(rows)
        if lengths is not None:
            self.lengths.append(lengths.astype(np.uint32))

    def finish(self) -> dict | None:
        if self.sequences == 0:
            return None
        entry = {"file": self.name, "sequences": self.sequences, "bytes": self.file.size,
                 "sha256": self.file.commit()}
        if self.wrap:
            return entry | {"real_tokens": self.sequences * self.block_size}
        lengths = np.concatenate(self.lengths)
        len_name = self.name.replace(".bin", ".len")
        len_data = lengths.tobytes()
        fmt.atomic_write_bytes(self.directory / len_name, len_data)
        return entry | {"real_tokens": int(lengths.sum()), "lengths": len_name,
                        "lengths_sha256": hashlib.sha256(len_data).hexdigest()}

    def abort(self) -> None:
        self.file.abort()


def _meta(spec: BuildSpec, tokenizer, state: dict, bos: int, eos: int, dtype) -> dict:
    return {
        "format_version": fmt.FORMAT_VERSION,
        "dataset": str(spec.dataset),
        "split": spec.split,
        "tokenizer": spec.tokenizer_name,
        "vocab_hash": vocab_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "bos_id": bos,
        "eos_id": eos,
        "pad_id": tokenizer.pad_token_id,
        "mask_id": tokenizer.mask_token_id if tokenizer.mask_token is not None else None,
        "block_size": spec.block_size,
        "mode": "wrap" if spec.wrap else "pad",
        "wrap_group_docs": spec.wrap_group_docs if spec.wrap else None,
        "wrap_group_procs": spec.wrap_group_procs if spec.wrap else None,
        **spec.framing(),
        "dtype": np.dtype(dtype).name,
        "num_documents": state["docs_done"],
        "num_sequences": sum(s["sequences"] for s in state["shards"]),
        "num_tokens": sum(s["sequences"] for s in state["shards"]) * spec.block_size,
        "num_real_tokens": sum(s["real_tokens"] for s in state["shards"]),
        "attention_mask": ("all ones" if spec.wrap else
                           "position < length, lengths in each shard's .len file (uint32)"),
        "shards": state["shards"],
    }


def _main(cfg) -> None:
    from pretrain.resolvers import absolutize_paths

    absolutize_paths(cfg)
    try:
        with torch_hidden() as hidden:  # transformers and the tokenizer, without torch
            from pretrain.data.datasets import build_spec, ensure_shards, tokenizer_for

            tokenizer = tokenizer_for(cfg)
    except ImportError as err:  # transformers' torch-only classes say "requires PyTorch"
        if not hidden or not (err.name == "torch" or "PyTorch" in str(err)):
            raise
        _rerun_with_torch()
    summary = {}
    specs = {kind: build_spec(cfg, kind) for kind in ("train", "valid")}
    with Encoder(tokenizer, specs["train"].num_proc, specs["train"].tokenize) as encoder:
        for kind, spec in specs.items():  # one set of workers for every split
            started = time.perf_counter()
            directory = ensure_shards(spec, tokenizer, encoder=encoder)
            meta = fmt.read_meta(directory)
            summary[kind] = {"directory": str(directory), "sequences": meta["num_sequences"],
                             "tokens": meta["num_tokens"], "documents": meta["num_documents"],
                             "seconds": round(time.perf_counter() - started, 3)}
    print(json.dumps(summary))


def _rerun_with_torch():
    from hydra.core.hydra_config import HydraConfig

    print("prepare: this tokenizer needs torch to load; running again with it.",
          file=sys.stderr, flush=True)
    os.chdir(HydraConfig.get().runtime.cwd)  # the overrides' relative paths are from there
    os.execve(sys.executable, [sys.executable, "-m", "pretrain.data.prepare", *sys.argv[1:]],
              dict(os.environ, **{WITH_TORCH: "1"}))


def _task(cfg) -> None:
    """A mistake a user can fix is one line on stderr and exit status 2; a bug keeps its
    traceback."""
    from model.errors import UserError

    try:
        _main(cfg)
    except UserError as err:
        print(f"prepare: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _read_overrides(argv: list[str]) -> list[str]:
    """``argv`` read as ``mdlm`` reads it (the releases' keys translated, each noted) and
    checked: a misspelt key or group choice stops with the closest valid one named (exit
    status 2); said as ``prepare: ...``."""
    import contextlib
    import io

    from pretrain.cli import check_overrides, translate_algo, translate_lightning

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            argv = translate_algo(translate_lightning(argv))
            check_overrides(argv)
    finally:
        sys.stderr.write(said.getvalue().replace("mdlm: ", "prepare: "))
    return argv


def main() -> None:
    import hydra

    from pretrain.resolvers import register

    register()
    sys.argv[1:] = _read_overrides(sys.argv[1:])
    hydra.main(config_path="../config", config_name="config", version_base=None)(_task)()


if __name__ == "__main__":
    main()
