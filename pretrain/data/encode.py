"""Documents -> token ids, in parallel where the parallelism is cheapest.

A fast (Rust) tokenizer encodes a batch of documents on ``num_proc`` threads of its own
(``encode_batch``) inside the building process, so no text or token is pickled between
processes ("threads"); beyond ``THREADS_PER_WORKER`` cores, worker processes of that many
threads each ("both"); a tokenizer written in Python (text8, sentencepiece) runs in
``num_proc`` spawned single-threaded worker processes ("processes").
``benchmarks/bench_data.py --strategies`` measures the three against each other. One
``Encoder`` serves every split of a build and starts its workers once, on first use.

Wrap mode gives each batch's ids followed by EOS, flattened, with per-document counts; pad
mode gives rows of ``block_size`` ids (special tokens added, truncated and padded) and the
real lengths. Both are exactly what ``tokenizer(texts, ...)`` gives (a test checks).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import sys
from collections import deque

import numpy as np

STRATEGIES = ("auto", "threads", "processes", "both")
WITH_TORCH = "PRETRAIN_PREPARE_WITH_TORCH"  # set: tokenizers load with torch importable
THREADS_PER_WORKER = 8  # "both": worker processes of this many Rust threads each


def framing_ids(tokenizer) -> tuple[int, int]:
    """BOS and EOS ids as the release computes them for wrapping: the first id of
    ``encode(bos_token)`` and of ``encode(eos_token)``. For GPT-2 both are <|endoftext|>; for
    a BERT tokenizer (whose encode adds [CLS] ... [SEP]) both are [CLS], as in the release."""
    return tokenizer.encode(tokenizer.bos_token)[0], tokenizer.encode(tokenizer.eos_token)[0]


def rust_backend(tokenizer):
    """The fast tokenizer's Rust tokenizer set up as ``tokenizer(texts,
    add_special_tokens=False)`` runs it (no truncation, no padding), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


class _Codec:
    """What one process needs to encode: the tokenizer, its Rust backend, EOS."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = rust_backend(tokenizer)
        self.eos = framing_ids(tokenizer)[1]

    def __call__(self, texts: list[str], wrap: bool, block_size: int):
        if wrap:
            if self.backend is not None:
                encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
                ids = [e.ids for e in encode(texts, add_special_tokens=False)]
            else:
                ids = self.tokenizer(texts, add_special_tokens=False,
                                     return_attention_mask=False,
                                     return_token_type_ids=False)["input_ids"]
            return flatten(ids, self.eos)
        enc = self.tokenizer(texts, max_length=block_size, padding="max_length",
                             truncation=True, add_special_tokens=True,
                             return_attention_mask=True, return_token_type_ids=False)
        rows = np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(texts), block_size)
        lengths = np.asarray(enc["attention_mask"], dtype=np.int64).sum(-1)
        return rows, lengths


def flatten(ids: list[list[int]], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's ids followed by EOS, as one array, and the per-document counts."""
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids),
                       dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


@contextlib.contextmanager
def torch_hidden():
    """Torch hidden from the import system (``import torch`` fails, ``find_spec`` finds
    nothing) while transformers is imported and a tokenizer loads, in a process that has
    not imported torch; yields whether it hid it.

    Tokenizing needs no torch, but transformers imports it wherever it is installed (its
    ``AutoTokenizer`` loads a model config, whose module imports torch): about 1 s of
    import, 0.4 s of teardown and 190 MB, a third of a small build's time. Hidden,
    transformers works as where torch is not installed, and tokenizers behave the same
    (``tests/pretrain/test_prepare_identity.py`` checks the ``prepare`` command's shards
    byte for byte against a build with torch loaded). Afterwards torch is importable again for
    whatever needs it (``datasets``' hashing). ``PRETRAIN_PREPARE_WITH_TORCH=1`` turns
    this off.
    """
    if "torch" in sys.modules or os.environ.get(WITH_TORCH):
        yield False
        return
    advice = "TRANSFORMERS_NO_ADVISORY_WARNINGS"  # its "PyTorch was not found" advice
    silenced = advice not in os.environ
    sys.modules["torch"] = None
    if silenced:
        os.environ[advice] = "1"
    try:
        yield True
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
        if silenced:
            os.environ.pop(advice, None)


_CODEC = None


def _init_worker(tokenizer: bytes, threads: int) -> None:
    global _CODEC
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    with torch_hidden():  # a spawned worker only tokenizes
        _CODEC = _Codec(pickle.loads(tokenizer))


def _encode(job):
    return _CODEC(*job)


def choose(tokenizer, strategy: str = "auto", num_proc: int = 1) -> str:
    """``auto``: a fast tokenizer's own threads (the fastest measured, on 2 cores) up to
    ``THREADS_PER_WORKER`` cores; beyond, worker processes of that many threads each, since
    the building process's own Python work per token (reading, ids into numpy) bounds
    what one process's threads can reach (``benchmarks/bench_data.py`` measures that bound).
    A Python tokenizer (text8, sentencepiece) runs in worker processes."""
    if strategy not in STRATEGIES:
        from pretrain.data.sources import DataError

        raise DataError(f"shards.tokenize={strategy!r} is not one of {STRATEGIES}; "
                        "use one of them (auto picks the fastest).")
    if strategy == "auto":
        if not getattr(tokenizer, "is_fast", False):
            return "processes"
        return "threads" if num_proc <= THREADS_PER_WORKER else "both"
    return strategy


def _worker_died():
    from pretrain.data.sources import DataError

    return DataError("a tokenizer worker process died (killed, or out of memory) during the "
                     "build; lower shards.num_proc or free memory and run again: the build "
                     "resumes from its last finished shard.")


class Encoder:
    """Encodes batches of documents with ``num_proc`` cores, in order, keeping at most
    ``window`` batches in flight so memory stays bounded whatever the split's size."""

    def __init__(self, tokenizer, num_proc: int = 1, strategy: str = "auto"):
        self.tokenizer = tokenizer
        self.num_proc = max(1, int(num_proc))
        self.strategy = choose(tokenizer, strategy, self.num_proc)
        self.pool = None
        self.codec = None
        self.threads = None

    def _start(self) -> None:
        if self.strategy == "processes" and self.num_proc > 1:
            self._start_pool(self.num_proc, 1)
        elif self.strategy == "both" and self.num_proc > 1:
            procs = max(1, self.num_proc // THREADS_PER_WORKER)
            self._start_pool(procs, self.num_proc // procs)
        else:  # threads in this process (a single core for "processes" at num_proc=1)
            threads = self.num_proc if self.strategy != "processes" else 1
            # Rust's threads on for the build only; after it they are off unless the user
            # set them: a fork (DataLoader workers) with them on would deadlock in the child.
            self._env = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM",
                                                        "RAYON_NUM_THREADS")}
            os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
            self.codec = _Codec(self.tokenizer)
            from concurrent.futures import ThreadPoolExecutor

            # With several threads two batches encode at once (the Rust call frees the GIL),
            # so the tokenizer's threads stay busy while one batch's ids go into numpy and
            # this thread reads the next documents; with one, a single batch at a time.
            self.procs = 2 if threads > 1 else 1  # batches encoding at once
            self.threads = ThreadPoolExecutor(self.procs)

    def _start_pool(self, procs: int, threads: int) -> None:
        """Spawned workers in a ``ProcessPoolExecutor``, which fails every pending batch
        when a worker dies (killed, out of memory) instead of waiting for it for ever."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker,
                                        initargs=(pickle.dumps(self.tokenizer), threads))
        self.procs = procs

    def map(self, jobs, window: int | None = None):
        """Yields ``(result, extra)`` for each ``(texts, wrap, block_size, extra)`` of
        ``jobs``, in order."""
        if self.pool is None and self.codec is None:
            self._start()
        window = window or (2 * self.procs if self.pool is not None else self.procs + 1)
        pending = deque()
        for texts, wrap, block_size, extra in jobs:
            if self.pool is not None:
                pending.append((self._submit(texts, wrap, block_size), extra))
            else:
                pending.append((self.threads.submit(self.codec, texts, wrap, block_size),
                                extra))
            if len(pending) >= window:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def _submit(self, texts, wrap, block_size):
        """A batch for the pool; a pool that already knows a worker died refuses it here,
        before any pending result says so."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return self.pool.submit(_encode, (texts, wrap, block_size))
        except BrokenProcessPool:
            raise _worker_died() from None

    @staticmethod
    def _result(item):
        from concurrent.futures.process import BrokenProcessPool

        future, extra = item
        try:
            return future.result(), extra
        except BrokenProcessPool:
            raise _worker_died() from None

    def close(self) -> None:
        if self.pool is not None:
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.terminate()  # workers mid-batch are not waited for
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.threads is not None:
            self.threads.shutdown()
            self.threads = None
            for key, value in self._env.items():
                if value is not None:
                    os.environ[key] = value
                elif key == "TOKENIZERS_PARALLELISM":
                    os.environ[key] = "false"  # off for forks, without tokenizers' warning
                else:
                    os.environ.pop(key, None)
        self.codec = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
