import json

import numpy as np
import pytest

from pretrain.data import shards as fmt
from pretrain.data.prepare import BuildSpec, build
from pretrain.data.shards import ShardDataset
from pretrain.data.tokenizers import get_tokenizer, normalize, vocab_hash
from tests.pretrain.data_helpers import corpus, word_tokenizer

L = 8


def spec(tmp_path, dataset, wrap=True, **kw):
    kw.setdefault("docs_per_shard", 7)
    return BuildSpec(dataset=str(dataset), split="train", tokenizer_name="words", block_size=L,
                     wrap=wrap, cache_dir=str(tmp_path / "cache"), **kw)


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def rows(directory):
    ds = ShardDataset(directory)
    return [(ds[i]["input_ids"].tolist(), ds[i]["attention_mask"].tolist())
            for i in range(len(ds))]


def test_wrap_blocks_by_hand(tmp_path):
    tok = word_tokenizer("gpt2")
    docs = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9", "w10 w11", "w12 w13 w14 w15"]
    eot = 40
    # documents + EOS, concatenated: 1 2 3 E 4 E 5 6 7 8 9 E 10 11 E 12 13 14 15 E (20 tokens)
    stream = [1, 2, 3, eot, 4, eot, 5, 6, 7, 8, 9, eot, 10, 11, eot, 12, 13, 14, 15, eot]
    body = L - 2
    expected = [[eot] + stream[i:i + body] + [eot] for i in range(0, 18, body)]  # tail dropped
    for docs_per_shard in (1, 2, 100):  # the carry across shards changes nothing
        directory = build(spec(tmp_path / str(docs_per_shard),
                               write_jsonl(tmp_path / "d.jsonl", docs),
                               docs_per_shard=docs_per_shard), tok, progress=False)
        got = rows(directory)
        assert [r for r, _ in got] == expected
        assert all(m == [1] * L for _, m in got)
        meta = fmt.read_meta(directory)
        assert meta["num_sequences"] == 3 and meta["num_documents"] == 5
        assert meta["dtype"] == "uint16" and meta["mode"] == "wrap"
        assert (meta["bos_id"], meta["eos_id"], meta["pad_id"], meta["mask_id"]) == (
            eot, eot, 41, None)


def test_pad_rows_by_hand(tmp_path):
    tok = word_tokenizer("bert")
    docs = ["w0 w1", "w2 w3 w4 w5 w6 w7 w8 w9 w10", "w11"]
    directory = build(spec(tmp_path, write_jsonl(tmp_path / "d.jsonl", docs), wrap=False), tok,
                      progress=False)
    cls, sep, pad = 2, 3, 0
    w = lambda i: i + 5  # noqa: E731  word ids follow the 5 special tokens
    assert rows(directory) == [
        ([cls, w(0), w(1), sep, pad, pad, pad, pad], [1, 1, 1, 1, 0, 0, 0, 0]),
        ([cls, w(2), w(3), w(4), w(5), w(6), w(7), sep], [1] * 8),  # truncated, keeps [SEP]
        ([cls, w(11), sep, pad, pad, pad, pad, pad], [1, 1, 1, 0, 0, 0, 0, 0]),
    ]
    meta = fmt.read_meta(directory)
    assert meta["mode"] == "pad" and meta["num_real_tokens"] == 4 + 8 + 3


def shard_bytes(directory):
    meta = fmt.read_meta(directory)
    out = {s["file"]: (directory / s["file"]).read_bytes() for s in meta["shards"]}
    return out, {k: v for k, v in meta.items() if k != "shards"}, meta["shards"]


@pytest.mark.parametrize("wrap", [True, False])
def test_killed_build_resumes_byte_identical(tmp_path, wrap):
    tok = word_tokenizer("gpt2" if wrap else "bert")
    data = write_jsonl(tmp_path / "d.jsonl", corpus(60, seed=1))
    reference = build(spec(tmp_path / "a", data, wrap=wrap), tok, progress=False)

    partial = spec(tmp_path / "b", data, wrap=wrap)
    directory = build(partial, tok, progress=False, stop_after=3)
    assert not (directory / fmt.META).exists()  # an unfinished build is never read
    with pytest.raises(fmt.ShardError, match="no finished shards"):
        ShardDataset(directory)
    (directory / ".shard_00003.bin.tmp123").write_bytes(b"half a shard")  # killed mid-write
    progress = json.loads((directory / "progress.json").read_text())
    assert progress["docs_done"] == 21
    build(partial, tok, progress=False, stop_after=2)
    resumed = build(partial, tok, progress=False)
    assert shard_bytes(resumed) == shard_bytes(reference)
    assert not (resumed / "progress.json").exists()


def test_worker_processes_give_identical_shards(tmp_path):
    tok = word_tokenizer("gpt2")
    data = write_jsonl(tmp_path / "d.jsonl", corpus(40, seed=2))
    one = build(spec(tmp_path / "a", data, batch_docs=5), tok, progress=False)
    two = build(spec(tmp_path / "b", data, batch_docs=5, num_proc=2), tok, progress=False)
    assert shard_bytes(one) == shard_bytes(two)


def test_local_formats(tmp_path):
    from pretrain.data.sources import read_local

    docs = ["w1 w2", "w3\nw4", "w5"]
    (tmp_path / "d").mkdir()
    for i, t in enumerate(docs):
        (tmp_path / "d" / f"{i}.txt").write_text(t + "\n")
    assert read_local(tmp_path / "d") == docs
    (tmp_path / "p.txt").write_text("w1 w2\n\nw3\nw4\n\n\nw5\n")
    assert read_local(tmp_path / "p.txt") == docs
    assert read_local(write_jsonl(tmp_path / "r.jsonl", docs)) == docs
    (tmp_path / "r.json").write_text(json.dumps([{"text": t} for t in docs]))
    assert read_local(tmp_path / "r.json") == docs
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "id": [1, 2, 3]}), tmp_path / "r.parquet")
    assert read_local(tmp_path / "r.parquet") == docs
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        read_local(tmp_path / "bad.jsonl")


def test_too_little_text_for_one_block(tmp_path):
    with pytest.raises(ValueError, match="no complete block"):
        build(spec(tmp_path, write_jsonl(tmp_path / "d.jsonl", ["w1"])), word_tokenizer(),
              progress=False)


def test_builtin_corpus(tmp_path):
    from pretrain.data import builtin

    train, valid = builtin.documents("train"), builtin.documents("validation")
    assert len(valid) == (len(train) + len(valid)) // 10 and not set(train) & set(valid)
    tok = get_tokenizer("builtin", str(tmp_path / "cache"))
    assert tok.vocab_size == builtin.VOCAB_SIZE and tok.bos_token_id == tok.eos_token_id == 0
    retrained = normalize(builtin.train_tokenizer(train))
    assert vocab_hash(retrained) == vocab_hash(tok)  # training is deterministic
    directory = build(BuildSpec("builtin", "validation", "builtin", 128, True,
                                str(tmp_path / "cache")), tok, progress=False)
    ds = ShardDataset(directory)
    assert len(ds) > 20
    text = tok.decode(ds[1]["input_ids"][1:-1])
    assert sum(c.isalpha() for c in text) > 0.5 * len(text)
    assert np.all(ds[0]["input_ids"].numpy()[[0, -1]] == 0)


@pytest.mark.slow
def test_prepare_command_builds_both_splits(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "pretrain.data.prepare", "data=builtin", "model.length=64",
         f"data.cache_dir={tmp_path / 'cache'}", "shards.num_proc=2",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["train"]["sequences"] > 5 * summary["valid"]["sequences"] > 0
    assert "builtin-validation-L64-wrap" in summary["valid"]["directory"]


def test_wrap_with_a_bert_tokenizer_frames_with_cls_as_the_release(tmp_path):
    """The release takes encode(eos_token)[0] as EOS, which is [CLS] for BERT."""
    tok = word_tokenizer("bert")
    directory = build(spec(tmp_path, write_jsonl(tmp_path / "d.jsonl", ["w1 w2 w3", "w4 w5"])),
                      tok, progress=False)
    cls = 2
    assert rows(directory)[0][0] == [cls, 6, 7, 8, cls, 9, 10, cls]
    meta = fmt.read_meta(directory)
    assert (meta["bos_id"], meta["eos_id"]) == (cls, cls)


@pytest.mark.parametrize("procs", [1, 3])
def test_wrap_groups_match_the_releases_batched_map(tmp_path, procs):
    """Blocks equal those of datasets' map(group, batched=True, num_proc=procs) over the
    tokenized documents, the release's wrapping: each 1000-document batch (of each of the
    procs contiguous parts) concatenated, cut, and its tail dropped. Shards of 700
    documents cut groups, a killed build resumes in the middle of one, and 7 worker
    batches per group change nothing."""
    import itertools

    import datasets

    tok = word_tokenizer("gpt2")
    docs = corpus(2600, seed=3, max_words=12)
    eot = tok.eos_token_id
    ids = [tok(d, add_special_tokens=False)["input_ids"] + [eot] for d in docs]

    def group(batch):
        flat = list(itertools.chain(*batch["input_ids"]))
        body = L - 2
        return {"input_ids": [[eot] + flat[i:i + body] + [eot]
                              for i in range(0, len(flat) // body * body, body)]}

    released = datasets.Dataset.from_dict({"input_ids": ids}).map(
        group, batched=True, num_proc=procs if procs > 1 else None,
        remove_columns=["input_ids"])["input_ids"]

    data = write_jsonl(tmp_path / "d.jsonl", docs)
    kw = dict(docs_per_shard=700, batch_docs=150, wrap_group_procs=procs)
    directory = build(spec(tmp_path, data, **kw), tok, progress=False, stop_after=2)
    directory = build(spec(tmp_path, data, **kw), tok, progress=False)
    got = [r for r, _ in rows(directory)]
    assert got == released
    whole = [r for r, _ in rows(build(spec(tmp_path / "w", data, wrap_group_docs=0), tok,
                                      progress=False))]
    assert len(whole) > len(got)  # one tail dropped instead of one per group
    assert directory.name != build(spec(tmp_path / "w", data, wrap_group_docs=0), tok,
                                   progress=False).name
