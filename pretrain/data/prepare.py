"""Raw text -> token shards, in parallel, resumably and atomically.

``python -m pretrain.data.prepare <overrides>`` builds the shards of ``data.train`` and
``data.valid`` for the run config's tokenizer and ``model.length`` under ``data.cache_dir``;
training and evaluation call the same code when shards are missing.

Documents are taken in fixed groups of ``shards.docs_per_shard``; each group becomes one
shard. Wrap mode appends EOS to every document and, as the release's
``map(group_texts, batched=True, num_proc=P)`` does, concatenates each *wrap group* of
``shards.wrap_group_docs`` consecutive documents (1000, the release's map batch), cuts it
into ``block_size - 2`` tokens framed as [BOS] chunk [EOS] and drops the group's incomplete
tail. With ``shards.wrap_group_procs=P`` the split is first cut into P contiguous parts as
``datasets`` does for P processes, each grouped from its own start, which reproduces a
cache the release built with ``num_proc=P``; ``shards.wrap_group_docs=0`` concatenates the
whole split (one tail dropped). Pad mode tokenizes each document with its special tokens,
truncated and padded to ``block_size``. After each shard, ``progress.json`` records what is
finished (and the tokens carried into the next shard), so a rerun skips finished shards and
produces byte-identical files; ``meta.json``, written last, marks the directory complete.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pretrain.data import shards as fmt
from pretrain.data.sources import open_source
from pretrain.data.tokenizers import vocab_hash

PROGRESS = "progress.json"


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
    batch_docs: int = 1_000
    wrap_group_docs: int = 1_000  # 0: the whole split is one group
    wrap_group_procs: int = 1


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
    root = Path(os.path.expanduser(spec.cache_dir))
    return root / f"{name}-{spec.split}-L{spec.block_size}-{mode}-{vocab_hash(tokenizer)}"


# ----------------------------------------------------------------------------- tokenizing
_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = tokenizer


def _tokenize(job):
    """One batch of documents -> (flat tokens, per-document token counts) in wrap mode, or
    (rows of block_size tokens, real lengths) in pad mode."""
    texts, wrap, block_size = job
    tok = _TOKENIZER
    if wrap:
        ids = tok(texts, add_special_tokens=False, return_attention_mask=False,
                  return_token_type_ids=False)["input_ids"]
        eos = framing_ids(tok)[1]
        lengths = np.array([len(x) + 1 for x in ids], dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids),
                           dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths
    enc = tok(texts, max_length=block_size, padding="max_length", truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_token_type_ids=False)
    rows = np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(texts), block_size)
    lengths = np.asarray(enc["attention_mask"], dtype=np.int64).sum(-1)
    return rows, lengths


class _Tokenizer:
    """Runs ``_tokenize`` over batches, in worker processes when num_proc > 1."""

    def __init__(self, tokenizer, num_proc: int):
        self.pool = None
        if num_proc > 1:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,))
        else:
            _init_worker(tokenizer)

    def map(self, jobs):
        return self.pool.imap(_tokenize, jobs) if self.pool else map(_tokenize, jobs)

    def close(self):
        if self.pool:
            self.pool.terminate()
            self.pool.join()


# ----------------------------------------------------------------------------- building
def _groups(texts, size):
    group = []
    for text in texts:
        group.append(text)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class WrapGroups:
    """Where the wrap groups of a split end (document indices, exclusive)."""

    def __init__(self, group_docs: int, procs: int, num_docs: int | None, name: str):
        if group_docs < 0 or procs < 1:
            raise ValueError(f"shards.wrap_group_docs={group_docs} must be >= 0 and "
                             f"shards.wrap_group_procs={procs} >= 1.")
        if procs > 1 and num_docs is None:
            raise ValueError(f"shards.wrap_group_procs={procs} needs the number of documents "
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


def _jobs(start: int, count: int, groups: WrapGroups | None, batch_docs: int):
    """Documents [start, start + count) cut into (offset, size, ends_group) jobs of at most
    ``batch_docs``, every wrap group ending at the end of a job."""
    offset = 0
    while offset < count:
        size = min(batch_docs, count - offset)
        ends_group = False
        end = groups.next_end(start + offset) if groups is not None else None
        if end is not None and end - start - offset <= size:
            size, ends_group = end - start - offset, True
        yield offset, size, ends_group
        offset += size


def framing_ids(tokenizer) -> tuple[int, int]:
    """BOS and EOS ids as the release computes them for wrapping: the first id of
    ``encode(bos_token)`` and of ``encode(eos_token)``. For GPT-2 both are <|endoftext|>; for
    a BERT tokenizer (whose encode adds [CLS] ... [SEP]) both are [CLS], as in the release."""
    return tokenizer.encode(tokenizer.bos_token)[0], tokenizer.encode(tokenizer.eos_token)[0]


def _frame(stream: np.ndarray, block_size: int, bos: int, eos: int):
    """Cuts a token stream into [BOS] + (block_size - 2 tokens) + [EOS] rows; returns the
    rows and the uncut remainder."""
    body = block_size - 2
    n = len(stream) // body
    rows = np.empty((n, block_size), dtype=np.int64)
    rows[:, 0] = bos
    rows[:, 1:-1] = stream[: n * body].reshape(n, body)
    rows[:, -1] = eos
    return rows, stream[n * body:]


def build(spec: BuildSpec, tokenizer, progress: bool = True, stop_after=None) -> Path:
    """Builds (or finishes) the shards of ``spec``; returns their directory.

    ``stop_after`` (tests only) stops after that many new shards, as a killed run would.
    """
    from tqdm import tqdm

    directory = shard_dir(spec, tokenizer)
    if (directory / fmt.META).is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    params = asdict(spec) | {"num_proc": None, "vocab_hash": vocab_hash(tokenizer)}
    state = {"params": params, "docs_done": 0, "carry": [], "shards": []}
    if (directory / PROGRESS).is_file():
        import json

        saved = json.loads((directory / PROGRESS).read_text())
        if saved.get("params") == params:
            state = saved

    vocab_size = len(tokenizer)
    dtype = fmt.token_dtype(vocab_size)
    bos, eos = framing_ids(tokenizer)
    source = open_source(spec.dataset, spec.split, spec.cache_dir, spec.streaming,
                         spec.block_size)
    groups = (WrapGroups(spec.wrap_group_docs, spec.wrap_group_procs, source.num_docs,
                         spec.dataset) if spec.wrap else None)
    carry = np.asarray(state["carry"], dtype=np.int64)
    workers = _Tokenizer(tokenizer, spec.num_proc)
    bar = tqdm(total=source.num_docs, initial=state["docs_done"], unit="doc",
               disable=not progress, desc=f"{spec.dataset}:{spec.split}")
    started, new_tokens, new_shards = time.perf_counter(), 0, 0
    try:
        for docs in _groups(source.texts(state["docs_done"]), spec.docs_per_shard):
            cuts = list(_jobs(state["docs_done"], len(docs), groups, spec.batch_docs))
            parts = list(workers.map([(docs[i:i + n], spec.wrap, spec.block_size)
                                      for i, n, _ in cuts]))
            if spec.wrap:
                pieces = []
                for (flat, _), (_, _, ends_group) in zip(parts, cuts):
                    rows, carry = _frame(np.concatenate([carry, flat]), spec.block_size,
                                         bos, eos)
                    pieces.append(rows)
                    if ends_group:
                        carry = carry[:0]  # the group's incomplete tail is dropped
                rows = np.concatenate(pieces)
                lengths = None
            else:
                rows = np.concatenate([r for r, _ in parts])
                lengths = np.concatenate([n for _, n in parts]).astype(np.uint32)
            entry = _write_shard(directory, len(state["shards"]), rows.astype(dtype), lengths)
            if entry is not None:
                state["shards"].append(entry)
            state["docs_done"] += len(docs)
            state["carry"] = carry.tolist() if spec.wrap else []
            fmt.atomic_write_json(directory / PROGRESS, state)
            new_tokens += sum(int(n.sum()) for _, n in parts)
            new_shards += 1
            bar.update(len(docs))
            bar.set_postfix(tokens_per_s=f"{new_tokens / (time.perf_counter() - started):,.0f}")
            if stop_after is not None and new_shards >= stop_after:
                return directory
    finally:
        workers.close()
        bar.close()

    if not state["shards"]:
        raise ValueError(
            f"{spec.dataset} ({spec.split}) gave no complete block of {spec.block_size} "
            "tokens; use a larger corpus or a smaller model.length."
        )
    meta = {
        "format_version": fmt.FORMAT_VERSION,
        "dataset": str(spec.dataset),
        "split": spec.split,
        "tokenizer": spec.tokenizer_name,
        "vocab_hash": vocab_hash(tokenizer),
        "vocab_size": vocab_size,
        "bos_id": bos,
        "eos_id": eos,
        "pad_id": tokenizer.pad_token_id,
        "mask_id": tokenizer.mask_token_id if tokenizer.mask_token is not None else None,
        "block_size": spec.block_size,
        "mode": "wrap" if spec.wrap else "pad",
        "wrap_group_docs": spec.wrap_group_docs if spec.wrap else None,
        "wrap_group_procs": spec.wrap_group_procs if spec.wrap else None,
        "dtype": np.dtype(dtype).name,
        "num_documents": state["docs_done"],
        "num_sequences": sum(s["sequences"] for s in state["shards"]),
        "num_tokens": sum(s["sequences"] for s in state["shards"]) * spec.block_size,
        "num_real_tokens": sum(s["real_tokens"] for s in state["shards"]),
        "attention_mask": ("all ones" if spec.wrap else
                           "position < length, lengths in each shard's .len file (uint32)"),
        "shards": state["shards"],
    }
    fmt.atomic_write_json(directory / fmt.META, meta)
    (directory / PROGRESS).unlink(missing_ok=True)
    return directory


def _write_shard(directory: Path, index: int, rows: np.ndarray, lengths) -> dict | None:
    if len(rows) == 0:
        return None
    name = f"shard_{index:05d}.bin"
    data = rows.tobytes()
    fmt.atomic_write_bytes(directory / name, data)
    entry = {"file": name, "sequences": len(rows), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest(),
             "real_tokens": int(lengths.sum()) if lengths is not None else int(rows.size)}
    if lengths is not None:
        len_name = f"shard_{index:05d}.len"
        len_data = lengths.tobytes()
        fmt.atomic_write_bytes(directory / len_name, len_data)
        entry.update(lengths=len_name, lengths_sha256=hashlib.sha256(len_data).hexdigest())
    return entry


def _main(cfg) -> None:
    import json

    from pretrain.data.datasets import build_spec, ensure_shards, tokenizer_for
    from pretrain.resolvers import absolutize_paths

    absolutize_paths(cfg)
    tokenizer = tokenizer_for(cfg)
    summary = {}
    for kind in ("train", "valid"):
        spec = build_spec(cfg, kind)
        directory = ensure_shards(spec, tokenizer)
        meta = fmt.read_meta(directory)
        summary[kind] = {"directory": str(directory), "sequences": meta["num_sequences"],
                         "tokens": meta["num_tokens"], "documents": meta["num_documents"]}
    print(json.dumps(summary))


def main() -> None:
    import hydra

    from pretrain.resolvers import register

    register()
    hydra.main(config_path="../config", config_name="config", version_base=None)(_main)()


if __name__ == "__main__":
    main()
