"""Data preparation: `python -m pretrain.data.prepare` against the MDLM release's
`datasets.map` path, on the same corpus, as whole processes.

The corpus is CPython's `pydoc_data.topics` x40, shuffled (about 19.5 MB of JSON lines),
with a 12-document validation file, and a byte-level BPE (GPT-2 layout) trained on it here:
no network. Both sides build both splits in wrap mode at L=1024 with `--procs` processes:
- release: `load_dataset("json")`, `map(tokenize, batched=True, num_proc=P)` (ids + EOS),
  `map(group_texts, batched=True, num_proc=P)` (the release's `_group_texts`, attention masks
  included) and `save_to_disk`, as the release's dataloader.py does;
- prepare: `python -m pretrain.data.prepare` with `shards.num_proc=P` and
  `shards.wrap_group_procs=P`, so that its blocks are exactly the release's (checked).
Runs alternate (release, prepare, release, ...); each is timed from start to exit, imports
included. Peak memory is the largest sum of the resident sizes of the run's processes
(sampled every 20 ms), and the largest single process's (from the kernel's rusage); CPU
seconds (user + system, all the run's processes) show the work apart from other load.
`--strategies` also times prepare's three ways to tokenize (threads, processes, both).
Per-core throughput: the training split's build time that prepare reports, with one
process; with the bound that the building process's own Python work sets, it projects the
time to prepare OpenWebText on 32 cores. Also: reading random batches of 64 blocks back
through ShardDataset.
Prints a readable table and one JSON line; saves the line under benchmarks/results/.

    python benchmarks/bench_data.py --procs 2 --repeats 3 --strategies
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
END_OF_TEXT = "<|endoftext|>"
OWT_TOKENS = 9e9  # OpenWebText in GPT-2 tokens


# ----------------------------------------------------------------------------- the corpus
def make_corpus(directory: Path, copies: int = 40, vocab_size: int = 4096, seed: int = 0):
    import random
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = [topics[name].strip() for name in sorted(topics)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = directory / "tokenizer"
    tok_dir.mkdir(parents=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "model_max_length": 1024}))
    train = docs * copies
    random.Random(seed).shuffle(train)
    paths = {}
    for name, texts in (("train", train), ("valid", docs[:12])):
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return paths["train"], paths["valid"], tok_dir


# ----------------------------------------------------------------------------- the release
def release_child(train: str, valid: str, tok_dir: str, out: str, procs: int, length: int):
    """The release's dataloader.py (get_tokenizer + get_dataset, wrap mode), on local files."""
    import functools
    import itertools

    import datasets
    import tokenizers
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    if isinstance(tokenizer, (transformers.GPT2TokenizerFast, transformers.GPT2Tokenizer)):
        tokenizer._tokenizer.post_processor = tokenizers.processors.BertProcessing(
            (tokenizer.bos_token, tokenizer.bos_token_id),
            (tokenizer.eos_token, tokenizer.eos_token_id))
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})

    def group_texts(examples, block_size, bos, eos):
        concatenated = list(itertools.chain(*examples["input_ids"]))
        body = block_size - 2
        total = (len(concatenated) // body) * body
        values, masks = [], []
        for i in range(0, total, body):
            values.append([bos] + concatenated[i:i + body] + [eos])
            masks.append(torch.ones(block_size))
        return {"input_ids": values, "attention_mask": masks}

    eos = tokenizer.encode(tokenizer.eos_token)[0]
    bos = tokenizer.encode(tokenizer.bos_token)[0]

    def preprocess_and_tokenize(example):
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        tokens = tokenizer(example["text"], add_special_tokens=False,
                           return_attention_mask=False, return_token_type_ids=False)
        return {"input_ids": [t + [eos] for t in tokens["input_ids"]]}

    for split, path in (("train", train), ("validation", valid)):
        data = datasets.load_dataset("json", data_files=path, split="train",
                                     cache_dir=f"{out}/hf")
        tokenized = data.map(preprocess_and_tokenize, batched=True, num_proc=procs,
                             load_from_cache_file=True, desc="Tokenizing")
        tokenized = tokenized.remove_columns("text")
        chunked = tokenized.map(functools.partial(group_texts, block_size=length, bos=bos,
                                                  eos=eos),
                                batched=True, num_proc=procs, load_from_cache_file=True,
                                desc="Grouping")
        chunked.save_to_disk(f"{out}/{split}")
        chunked = chunked.with_format("torch")


# ----------------------------------------------------------------------------- measuring
def _children(pid: int) -> list[int]:
    """``pid`` and its descendants, from each process's parent id in /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents.setdefault(int(text[text.rindex(")") + 2:].split()[1]), []).append(
            int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def timed(cmd: list[str], env: dict) -> dict:
    """Runs ``cmd`` to exit: wall seconds, peak summed RSS of its process tree, and the
    largest single process's peak RSS (rusage)."""
    import tempfile

    # output goes to files, not pipes: a child writing more than a pipe holds (progress
    # bars of a large corpus) would block while nobody reads the pipe until it exits
    out_file, err_file = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out_file, stderr=err_file)
    peak = 0
    while True:
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if done:
            break
        peak = max(peak, sum(_rss(p) for p in _children(proc.pid)))
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    out_file.seek(0)
    err_file.seek(0)
    stdout, stderr = out_file.read().decode(), err_file.read().decode()
    out_file.close()
    err_file.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": peak / 2**20,
            "max_process_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}


def prepare_cmd(train, valid, tok_dir, out, procs, length, strategy=None) -> list[str]:
    cmd = [sys.executable, "-m", "pretrain.data.prepare", f"data.train={train}",
           f"data.valid={valid}", f"data.tokenizer_name_or_path={tok_dir}",
           f"data.cache_dir={out}", f"model.length={length}", "data.wrap=True",
           f"shards.num_proc={procs}", f"shards.wrap_group_procs={procs}",
           f"hydra.run.dir={out}/run"]
    return cmd + ([f"+shards.tokenize={strategy}"] if strategy else [])


def release_cmd(train, valid, tok_dir, out, procs, length) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child-release", str(train),
            str(valid), str(tok_dir), str(out), "--procs", str(procs), "--length", str(length)]


def reader_tokens_per_s(directory: str, batch: int = 64, batches: int = 200) -> float:
    """Random batches of blocks read through ShardDataset (memmaps), tokens/s."""
    import numpy as np

    from pretrain.data.shards import ShardDataset

    ds = ShardDataset(directory, verify=False)
    rng = np.random.default_rng(0)
    started, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += sum(int(ds[int(i)]["input_ids"].numel())
                      for i in rng.integers(0, len(ds), size=batch))
    return tokens / (time.perf_counter() - started)


def same_blocks(prepare_out: str, release_out: str) -> tuple[int, bool]:
    """The prepare run's training blocks and whether they equal the release's."""
    import datasets
    import numpy as np

    from pretrain.data.shards import ShardDataset

    summary = json.loads(prepare_out.strip().splitlines()[-1])
    ours = ShardDataset(summary["train"]["directory"], verify=False)
    theirs = datasets.load_from_disk(f"{release_out}/train").with_format("numpy")
    mine = np.stack([ours[i]["input_ids"].numpy() for i in range(len(ours))])
    return len(ours), len(ours) == len(theirs) and np.array_equal(mine,
                                                                  theirs["input_ids"])


def serial_tokens_per_s(train: Path, tok_dir: Path) -> float:
    """Tokens/s of the Python work the building process does per token when the tokenizer's
    own threads encode (reading the documents, ids into numpy): a bound on that strategy's
    throughput whatever the number of cores."""
    from pretrain.data.encode import flatten, rust_backend
    from pretrain.data.sources import LocalCorpus
    from pretrain.data.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(str(tok_dir))
    started = time.perf_counter()
    docs = list(LocalCorpus(train).texts())
    seconds = time.perf_counter() - started
    encodings = rust_backend(tokenizer).encode_batch(docs, add_special_tokens=False)
    started, tokens = time.perf_counter(), 0
    for i in range(0, len(encodings), 256):
        tokens += len(flatten([e.ids for e in encodings[i:i + 256]], 0)[0])
    return tokens / (seconds + time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--strategies", action="store_true")
    parser.add_argument("--child-release", nargs=4, metavar=("TRAIN", "VALID", "TOK", "OUT"))
    args = parser.parse_args()
    if args.child_release:
        return release_child(*args.child_release, procs=args.procs, length=args.length)

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    env.pop("TOKENIZERS_PARALLELISM", None)  # each side as a user would run it
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, valid, tok_dir = make_corpus(tmp / "corpus", args.copies)
        common = (train, valid, tok_dir)
        # release and prepare as compared, and prepare with one process (per-core throughput)
        runs = {"release": [], "prepare": [], "prepare_1": []}
        if args.strategies:
            runs |= {s: [] for s in ("threads", "processes", "both")}
        for r in range(args.repeats):
            for name in runs:
                out = tmp / f"{name}-{r}"
                if name == "release":
                    cmd = release_cmd(*common, out, args.procs, args.length)
                elif name == "prepare_1":
                    cmd = prepare_cmd(*common, out, 1, args.length)
                else:
                    cmd = prepare_cmd(*common, out, args.procs, args.length,
                                      None if name == "prepare" else name)
                runs[name].append(timed(cmd, env) | {"out": str(out)})
                print(f"{name:>9} run {r}: {runs[name][-1]['seconds']:6.2f} s "
                      f"({runs[name][-1]['cpu_seconds']:6.2f} s CPU), peak "
                      f"{runs[name][-1]['peak_rss_mb']:7.0f} MiB", flush=True)
        blocks, identical = same_blocks(runs["prepare"][-1]["stdout"],
                                        runs["release"][-1]["out"])
        serial = serial_tokens_per_s(train, tok_dir)
        reader = reader_tokens_per_s(json.loads(runs["prepare"][-1]["stdout"].strip()
                                                .splitlines()[-1])["train"]["directory"])

    tokens = blocks * args.length
    median = {k: {key: statistics.median(run[key] for run in v)
                  for key in ("seconds", "cpu_seconds", "peak_rss_mb", "max_process_rss_mb")}
              for k, v in runs.items()}
    result = {
        "bench": "prepare_vs_release", "corpus": f"pydoc_data.topics x{args.copies}",
        "corpus_mb": train_mb(args.copies), "length": args.length, "processes": args.procs,
        "repeats": args.repeats, "train_tokens": tokens, "blocks_identical": identical,
        "cpus": os.cpu_count(), "loadavg_after": os.getloadavg()[0],
        "release_tokens_per_s": tokens / median["release"]["seconds"],
        "prepare_tokens_per_s": tokens / median["prepare"]["seconds"],
        "ratio": median["release"]["seconds"] / median["prepare"]["seconds"],
        "release_cpu_seconds": median["release"]["cpu_seconds"],
        "prepare_cpu_seconds": median["prepare"]["cpu_seconds"],
        "release_peak_rss_mb": median["release"]["peak_rss_mb"],
        "prepare_peak_rss_mb": median["prepare"]["peak_rss_mb"],
        "release_max_process_rss_mb": median["release"]["max_process_rss_mb"],
        "prepare_max_process_rss_mb": median["prepare"]["max_process_rss_mb"],
        "seconds": {k: [round(run["seconds"], 3) for run in v] for k, v in runs.items()},
    }
    build = {k: statistics.median(json.loads(run["stdout"].strip().splitlines()[-1])["train"][
        "seconds"] for run in runs[k]) for k in ("prepare", "prepare_1")}
    per_core = tokens / build["prepare_1"]
    building = tokens / build["prepare"]
    result |= {
        "per_core_tokens_per_s": per_core,
        "building_tokens_per_s": building,
        "scaling_efficiency": building / (args.procs * per_core),
        "serial_bound_tokens_per_s": serial, "reader_tokens_per_s": reader,
        "owt_32_cores_hours_linear": OWT_TOKENS / (32 * per_core) / 3600,
        "owt_32_cores_hours_bounded": OWT_TOKENS / min(32 * per_core, serial) / 3600,
    }
    if args.strategies:
        result["strategy_tokens_per_s"] = {s: tokens / median[s]["seconds"]
                                           for s in ("threads", "processes", "both")}
    print(f"\n{'':>9} {'tokens/s':>12} {'CPU s':>7} {'peak MiB':>9}  (median of "
          f"{args.repeats})")
    for name in runs:
        print(f"{name:>9} {tokens / median[name]['seconds']:>12,.0f} "
              f"{median[name]['cpu_seconds']:>7.1f} {median[name]['peak_rss_mb']:>9.0f}")
    print(f"prepare / release: {result['ratio']:.2f}x tokens/s; blocks identical: {identical}")
    print(f"building the training split (as prepare reports it), 1 process: {per_core:,.0f} "
          "tokens/s;"
          f" {args.procs} processes: {building:,.0f} tokens/s "
          f"({result['scaling_efficiency']:.0%} of linear); the building process's Python "
          f"work bounds the threads at {serial:,.0f} tokens/s")
    print(f"OpenWebText ({OWT_TOKENS / 1e9:.0f}B tokens) on 32 cores: "
          f"{result['owt_32_cores_hours_linear']:.2f} h at linear scaling, "
          f"{result['owt_32_cores_hours_bounded']:.2f} h under that bound")
    line = json.dumps(result)
    print(line)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_data_cpu.json").write_text(line + "\n")


def train_mb(copies: int) -> float:
    from pydoc_data.topics import topics

    return round(sum(len(json.dumps({"text": t.strip()})) + 1
                     for t in topics.values()) * copies / 1e6, 1)


if __name__ == "__main__":
    main()
