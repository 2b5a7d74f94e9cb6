"""Shards are byte-identical to those of the straightforward path (``tokenizer(texts)`` per
document, the release's wrap groups, one shard per ``docs_per_shard`` documents), whichever
way the tokenizing runs, and the build streams its source."""

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import shards as fmt
from pretrain.data.encode import Encoder
from pretrain.data.prepare import BuildSpec, build, shard_dir
from pretrain.data.tokenizers import get_tokenizer
from tests.pretrain.data_helpers import corpus, word_tokenizer, write_gpt2_style

L = 16


def documents():
    from pydoc_data.topics import topics

    texts = [topics[k].strip()[:400] for k in sorted(topics)[:30]]
    odd = ["", "héllo wörld — ünïcode ✓ 日本語", "  leading and trailing  ", "x", "a\n\nb"]
    return list(itertools.chain(*zip(texts, itertools.cycle(odd))))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return write_gpt2_style(tmp_path_factory.mktemp("bpe"), documents(), 300)


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return get_tokenizer(str(bpe_dir))


def reference(docs, tok, wrap, docs_per_shard, group_docs, procs, special=True,
              doc_eos=True):
    """Expected shard bytes, computed document by document (``special``: [BOS] ... [EOS]
    around each wrapped block; ``doc_eos``: EOS after each document)."""
    dtype = fmt.token_dtype(len(tok))
    if not wrap:
        rows = [tok(d, max_length=L, padding="max_length", truncation=True)["input_ids"]
                for d in docs]
        return [np.asarray(rows[i:i + docs_per_shard], dtype=dtype).tobytes()
                for i in range(0, len(docs), docs_per_shard)]
    bos, eos = tok.encode(tok.bos_token)[0], tok.encode(tok.eos_token)[0]
    div, mod = divmod(len(docs), procs)
    starts = [div * k + min(k, mod) for k in range(procs)] + [len(docs)]
    per_shard = {}
    for lo, hi in zip(starts, starts[1:]):
        for g in range(lo, hi, group_docs):
            tokens, owner = [], []  # each token and the document it came from
            for i in range(g, min(g + group_docs, hi)):
                ids = tok(docs[i], add_special_tokens=False)["input_ids"] + [eos] * doc_eos
                tokens += ids
                owner += [i] * len(ids)
            body = L - 2 if special else L
            for s in range(0, len(tokens) // body * body, body):
                # a block lands in the shard of the document that completes it
                per_shard.setdefault(owner[s + body - 1] // docs_per_shard, []).append(
                    [bos] * special + tokens[s:s + body] + [eos] * special)
    return [np.asarray(per_shard[k], dtype=dtype).tobytes() for k in sorted(per_shard)]


def built(directory):
    meta = fmt.read_meta(directory)
    for shard in meta["shards"]:
        data = (directory / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    return [(directory / s["file"]).read_bytes() for s in meta["shards"]], meta


@pytest.mark.parametrize("strategy", ["threads", "processes", "both"])
def test_wrap_shards_equal_the_reference(tmp_path, bpe, strategy):
    docs = documents()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
    expected = reference(docs, bpe, True, docs_per_shard=13, group_docs=7, procs=2)
    spec = BuildSpec(str(data), "train", "bpe", L, True, str(tmp_path / "c"),
                     docs_per_shard=13, batch_docs=3, wrap_group_docs=7, wrap_group_procs=2)
    with Encoder(bpe, 2, strategy) as encoder:
        assert encoder.strategy == strategy
        got, meta = built(build(spec, bpe, progress=False, encoder=encoder))
    assert got == expected and len(got) > 3
    assert meta["num_sequences"] * L * 2 == sum(map(len, expected))


@pytest.mark.parametrize("special,doc_eos", [(False, True), (True, False), (False, False)])
def test_the_release_framing_switches(tmp_path, bpe, special, doc_eos):
    """The BD3-LM release's data.insert_*_special=False (plain rows of L tokens) and
    data.insert_*_eos=False (no EOS after the documents), each in its own directory."""
    docs = documents()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
    expected = reference(docs, bpe, True, 13, 7, 2, special=special, doc_eos=doc_eos)
    spec = BuildSpec(str(data), "train", "bpe", L, True, str(tmp_path / "c"),
                     docs_per_shard=13, batch_docs=3, wrap_group_docs=7, wrap_group_procs=2,
                     special=special, doc_eos=doc_eos)
    directory = build(spec, bpe, progress=False, stop_after=2)  # killed, then resumed
    directory = build(spec, bpe, progress=False)
    got, meta = built(directory)
    assert got == expected and len(got) > 3
    assert meta["block_framing"] == ("[BOS] ... [EOS]" if special else "none")
    assert meta["document_eos"] == doc_eos
    # opened for a run that frames and ends documents (the default): named, not used
    with pytest.raises(fmt.ShardError, match="data.insert_train_"):
        fmt.ShardDataset(directory, expect={"block_framing": "[BOS] ... [EOS]",
                                            "document_eos": True})
    default = BuildSpec(str(data), "train", "bpe", L, True, str(tmp_path / "c"),
                        docs_per_shard=13, batch_docs=3, wrap_group_docs=7, wrap_group_procs=2)
    suffix = "-unframed" * (not special) + "-noeos" * (not doc_eos)
    assert directory.name == shard_dir(default, bpe).name.replace("-wrap7x2-",
                                                                  f"-wrap7x2{suffix}-")


@pytest.mark.parametrize("strategy", ["threads", "processes"])
def test_pad_shards_equal_the_reference(tmp_path, strategy):
    tok = word_tokenizer("bert")
    docs = corpus(50, seed=4, max_words=25) + [""]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    spec = BuildSpec(str(data), "train", "words", L, False, str(tmp_path / "c"),
                     docs_per_shard=20, batch_docs=6)
    with Encoder(tok, 2, strategy) as encoder:
        directory = build(spec, tok, progress=False, encoder=encoder)
    got, meta = built(directory)
    assert got == reference(docs, tok, False, 20, 0, 1)
    lengths = np.concatenate([np.fromfile(directory / s["lengths"], dtype=np.uint32)
                              for s in meta["shards"]])
    assert lengths.tolist() == [sum(tok(d, max_length=L, truncation=True)["attention_mask"])
                                for d in docs]


def test_one_encoder_serves_every_split_and_starts_once(tmp_path, bpe):
    docs = documents()
    paths = []
    for name, part in (("a", docs[:40]), ("b", docs[40:])):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    with Encoder(bpe, 2, "processes") as encoder:
        for path in paths:
            build(BuildSpec(str(path), "train", "bpe", L, True, str(tmp_path / "c")), bpe,
                  progress=False, encoder=encoder)
            if path == paths[0]:
                pool = encoder.pool
                pids = sorted(pool._processes)
        assert encoder.pool is pool and sorted(pool._processes) == pids


def test_a_killed_worker_stops_the_build_instead_of_hanging_it(bpe):
    import os
    import signal
    import time

    from pretrain.data.sources import DataError

    jobs = ((["some text to encode"] * 50, True, L, i) for i in range(10_000))
    started = time.monotonic()
    with Encoder(bpe, 2, "processes") as encoder:
        with pytest.raises(DataError, match="tokenizer worker process died"):
            for _, i in encoder.map(jobs):
                if i == 3:  # as the OOM killer would
                    os.kill(next(iter(encoder.pool._processes)), signal.SIGKILL)
    assert time.monotonic() - started < 60


def test_a_pool_that_already_lost_a_worker_refuses_the_next_batch_with_the_same_message(bpe):
    """The pool may learn of the death before any pending result does: then ``submit``
    itself fails, with the same one sentence."""
    import os
    import signal
    import time

    from pretrain.data.sources import DataError

    with Encoder(bpe, 2, "processes") as encoder:
        list(encoder.map([(["warm up"], True, L, 0)]))
        os.kill(next(iter(encoder.pool._processes)), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not encoder.pool._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(DataError, match="tokenizer worker process died"):
            list(encoder.map([(["some text"], True, L, 1)]))


def test_the_build_streams_its_source(tmp_path):
    """The first shard is written before the rest of the file is read: a malformed line
    after it does not stop a build told to stop after one shard."""
    tok = word_tokenizer("gpt2")
    docs = corpus(30, seed=5)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs) + "{not json\n")
    spec = BuildSpec(str(data), "train", "words", 8, True, str(tmp_path / "c"),
                     docs_per_shard=10, batch_docs=4)
    directory = build(spec, tok, progress=False, stop_after=2)
    assert json.loads((directory / "progress.json").read_text())["docs_done"] == 20
    with pytest.raises(fmt.UserError, match="line 31"):
        build(spec, tok, progress=False)


def test_auto_picks_the_tokenizers_threads_then_workers_of_threads(bpe):
    from pretrain.data.encode import THREADS_PER_WORKER, choose
    from pretrain.data.tokenizers import Text8Tokenizer

    assert choose(bpe, "auto", 2) == "threads"
    assert choose(bpe, "auto", THREADS_PER_WORKER + 1) == "both"
    assert choose(Text8Tokenizer(), "auto", 2) == "processes"
    with pytest.raises(fmt.UserError, match="shards.tokenize='fast'"):
        choose(bpe, "fast")


def test_local_files_count_and_resume_as_the_whole_list(tmp_path):
    from pretrain.data.sources import LocalCorpus, read_local

    docs = ["w1 w2", "w3\nw4", "w5", "ü"]
    (tmp_path / "d").mkdir()
    for i, t in enumerate(docs):
        (tmp_path / "d" / f"{i}.txt").write_text(t + "\n")
    (tmp_path / "p.txt").write_text("w1 w2\r\n\r\nw3\nw4\n\n\n\nw5\n \nü\n")
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n\n")
    for path in (tmp_path / "d", tmp_path / "p.txt", tmp_path / "r.jsonl"):
        corpus_ = LocalCorpus(path)
        whole = read_local(path)
        assert len(corpus_) == len(whole) and list(corpus_.texts(2)) == whole[2:]
        assert corpus_.cheap_len() in (None, len(whole))
    assert read_local(tmp_path / "p.txt") == ["w1 w2", "w3\nw4", "w5\n \nü"]
    assert read_local(tmp_path / "r.jsonl") == docs


def test_tokenizer_threads_are_off_after_a_build_for_later_forks(bpe, monkeypatch):
    import os

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    with Encoder(bpe, 2, "threads") as encoder:
        list(encoder.map([(["a b c"], True, L, 0)]))
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    # a fork with Rust's threads on would deadlock in the child when it tokenizes
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the user's own choice stays
    with Encoder(bpe, 2, "threads") as encoder:
        list(encoder.map([(["a b c"], True, L, 0)]))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"


@pytest.mark.parametrize("wrap", [True, False])
def test_the_prepare_command_builds_without_torch_the_same_bytes(tmp_path, bpe_dir, wrap):
    """The command loads its tokenizer with torch hidden (``encode.torch_hidden``) and never
    imports it; its shards equal, byte for byte and in name, a build in this process, whose
    tokenizer loaded with torch."""
    import re
    import subprocess
    import sys

    docs = documents()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pretrain.data.prepare",
         f"data.train={data}", f"data.valid={data}", f"data.tokenizer_name_or_path={bpe_dir}",
         f"data.cache_dir={tmp_path / 'cli'}", f"model.length={L}", f"data.wrap={wrap}",
         "shards.num_proc=2", "shards.docs_per_shard=13", "shards.wrap_group_docs=7",
         "shards.wrap_group_procs=2", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not re.search(r"\|\s+torch$", done.stderr, re.M), "the command imported torch"
    assert "PyTorch was not found" not in done.stderr
    theirs = Path(json.loads(done.stdout.strip().splitlines()[-1])["train"]["directory"])
    tok = get_tokenizer(str(bpe_dir))
    spec = BuildSpec(str(data), "train", str(bpe_dir), L, wrap, str(tmp_path / "here"),
                     docs_per_shard=13, num_proc=2, wrap_group_docs=7, wrap_group_procs=2)
    with Encoder(tok, 2) as encoder:
        ours = build(spec, tok, progress=False, encoder=encoder)
    assert ours.name == theirs.name
    (got, meta), (expected, their_meta) = built(ours), built(theirs)
    assert got == expected and len(got) > 1
    assert {k: v for k, v in meta.items() if k != "dataset"} == {
        k: v for k, v in their_meta.items() if k != "dataset"}


def test_torch_hidden_hides_it_only_while_open(tmp_path):
    import subprocess
    import sys

    code = """
import sys
from pretrain.data.encode import torch_hidden
with torch_hidden() as hidden:
    import transformers
    assert hidden and not transformers.is_torch_available()
    try:
        import torch
    except ModuleNotFoundError as err:
        assert err.name == "torch"
    else:
        raise AssertionError("torch imported while hidden")
import torch
with torch_hidden() as hidden:
    assert not hidden and sys.modules["torch"] is torch
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "PyTorch was not found" not in done.stderr
    from pretrain.data.encode import WITH_TORCH

    done = subprocess.run([sys.executable, "-c", "from pretrain.data.encode import "
                           "torch_hidden\nwith torch_hidden() as h:\n    assert not h"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(__import__("os").environ, **{WITH_TORCH: "1"}))
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_tokenizer_that_needs_torch_reruns_the_command_with_it(tmp_path, bpe_dir):
    """A tokenizer whose loading imports torch (here: get_tokenizer made to, from a
    sitecustomize) reruns the command with torch, from where it was started: relative paths
    still hold, though Hydra had moved into its run directory."""
    import os
    import subprocess
    import sys

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import pretrain.data.tokenizers as t\n"
        "real = t.get_tokenizer\n"
        "def needs_torch(*args, **kwargs):\n"
        "    import torch  # noqa: F401\n"
        "    return real(*args, **kwargs)\n"
        "t.get_tokenizer = needs_torch\n")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                              for t in documents()))
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(repo)]))
    env.pop("PRETRAIN_PREPARE_WITH_TORCH", None)
    done = subprocess.run(
        [sys.executable, "-m", "pretrain.data.prepare", "data.train=d.jsonl",
         "data.valid=d.jsonl", f"data.tokenizer_name_or_path={bpe_dir}",
         "data.cache_dir=cache", f"model.length={L}", "shards.num_proc=1",
         "hydra.run.dir=run"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("this tokenizer needs torch to load; running again") == 1
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(summary["train"]["directory"]).parent == tmp_path / "cache"
