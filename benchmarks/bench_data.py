"""Shard building and reading throughput.

prepare: tokens/s building wrap-mode shards of the built-in corpus and of a larger
synthetic corpus (random words), for each number of worker processes;
reader: tokens/s reading random batches of 1024-token blocks through ShardDataset.
Prints a readable table and one JSON line per measurement.

    python benchmarks/bench_data.py --procs 1,2 --synthetic-docs 20000
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from pretrain.data.prepare import BuildSpec, build
from pretrain.data.shards import ShardDataset, read_meta
from pretrain.data.tokenizers import get_tokenizer


def synthetic_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    r = random.Random(seed)
    words = ["the", "model", "diffusion", "token", "mask", "of", "and", "to", "sample",
             "training", "language", "a", "in", "is", "with", "data", "shard", "rank"]
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = r.randint(50, 800)
            f.write(json.dumps({"text": " ".join(r.choice(words) for _ in range(n)) + "."}))
            f.write("\n")
    return path


def bench_prepare(name, dataset, tokenizer, cache, procs, length) -> dict:
    spec = BuildSpec(dataset=str(dataset), split="train", tokenizer_name="builtin",
                     block_size=length, wrap=True, cache_dir=str(cache), num_proc=procs,
                     docs_per_shard=5_000)
    started = time.perf_counter()
    directory = build(spec, tokenizer, progress=False)
    seconds = time.perf_counter() - started
    meta = read_meta(directory)
    return {"bench": "prepare", "corpus": name, "processes": procs,
            "documents": meta["num_documents"], "tokens": meta["num_tokens"],
            "seconds": seconds, "tokens_per_s": meta["num_tokens"] / seconds}, directory


def bench_reader(directory, batch: int, batches: int, seed: int = 0) -> dict:
    ds = ShardDataset(directory)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        idx = rng.integers(0, len(ds), size=batch)
        rows = [ds[int(i)]["input_ids"] for i in idx]
        tokens += sum(int(r.numel()) for r in rows)
    seconds = time.perf_counter() - started
    return {"bench": "reader", "sequences": len(ds), "block": ds.block_size, "batch": batch,
            "batches": batches, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--synthetic-docs", type=int, default=20_000)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = get_tokenizer("builtin", str(tmp / "tok"))
        corpus = synthetic_corpus(tmp / "synthetic.jsonl", args.synthetic_docs)
        results, biggest = [], None
        for name, dataset in (("builtin", "builtin"), ("synthetic", corpus)):
            for procs in [int(p) for p in args.procs.split(",")]:
                result, directory = bench_prepare(name, dataset, tokenizer,
                                                  tmp / f"{name}-{procs}", procs, args.length)
                results.append(result)
                biggest = directory
                print(f"prepare {name:>9} procs={procs}: {result['tokens']:>10,} tokens "
                      f"{result['tokens_per_s']:>12,.0f} tok/s", flush=True)
        reader = bench_reader(biggest, args.batch, args.batches)
        print(f"reader  random batches of {args.batch} x {reader['block']}: "
              f"{reader['tokens_per_s']:>12,.0f} tok/s")
        for r in results + [reader]:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
