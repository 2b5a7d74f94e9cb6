"""Data-file mistakes stop `python -m pretrain.data.prepare` with one line naming the file
(and the line or byte) and exit status 2, no traceback; a bug keeps its traceback."""

import json
import os
import subprocess
import sys

import pytest

from tests.pretrain.data_helpers import write_gpt2_style


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    return write_gpt2_style(directory, ["some text to learn a few merges from"] * 3, 300)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet_without_text(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a document"]}), path)
    return path


# name -> (make the data file in tmp_path, what the message must name)
MISTAKES = {
    "missing": (lambda d: d / "nowhere" / "corpus.jsonl", ["nowhere/corpus.jsonl",
                                                           "does not exist"]),
    "empty": (lambda d: write(d / "empty.jsonl", b""), ["empty.jsonl", "no documents"]),
    "blank lines only": (lambda d: write(d / "blank.txt", b"\n\n  \n"),
                         ["blank.txt", "no documents"]),
    "too short": (lambda d: write(d / "short.jsonl", jsonl({"text": "one"})),
                  ["short.jsonl", "no complete block of 64"]),
    "not utf-8 txt": (lambda d: write(d / "latin.txt", "café\n\nnaïve".encode("latin-1")),
                      ["latin.txt", "not UTF-8", "byte 3"]),
    "not utf-8 jsonl": (lambda d: write(d / "latin.jsonl", jsonl({"text": "fine"}) +
                                        b'{"text": "caf\xe9"}\n'),
                        ["latin.jsonl", "not UTF-8", "byte 30"]),
    "malformed jsonl": (lambda d: write(d / "bad.jsonl", jsonl({"text": "a"}, {"text": "b"}) +
                                        b"\n" + b'{"text": "c",}\n'),
                        ["bad.jsonl", "line 4", "not valid JSON"]),
    "jsonl without text": (lambda d: write(d / "body.jsonl", jsonl({"text": "a"},
                                                                   {"body": "b"})),
                           ["body.jsonl", "line 2", "'text' field"]),
    "parquet without text": (lambda d: parquet_without_text(d / "body.parquet"),
                             ["body.parquet", "no 'text' column", "['body']"]),
    "damaged parquet": (lambda d: write(d / "cut.parquet", b"PAR1" + b"\0" * 64),
                        ["cut.parquet", "not a readable parquet file"]),
    "not a data file": (lambda d: write(d / "corpus.csv", b"text\nhello\n"),
                        ["corpus.csv", "is not a"]),
}


def prepare(tmp_path, *overrides):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "pretrain.data.prepare", "model.length=64",
         f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
         *overrides],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


QUICK = ("missing", "malformed jsonl", "not utf-8 jsonl")  # the rest run in the full suite


@pytest.mark.parametrize("mistake", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow)
                                     for m in sorted(MISTAKES)])
def test_a_data_file_mistake_is_one_line_and_status_2(tmp_path, tokenizer_dir, mistake):
    make, named = MISTAKES[mistake]
    path = make(tmp_path)
    done = prepare(tmp_path, f"data.train={path}", f"data.valid={path}",
                   f"data.tokenizer_name_or_path={tokenizer_dir}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("prepare: ")]
    assert len(lines) == 1, done.stderr[-2000:]
    for part in named:
        assert part in lines[0], lines[0]


def test_a_tokenizer_that_does_not_load_is_one_line(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(jsonl({"text": "a"}))
    done = prepare(tmp_path, f"data.train={tmp_path / 'd.jsonl'}",
                   f"data.tokenizer_name_or_path={tmp_path / 'no-tokenizer'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "prepare: data.tokenizer_name_or_path=" in done.stderr
    assert "no-tokenizer" in done.stderr


def test_a_misspelt_key_is_one_line_naming_the_closest(tmp_path):
    done = prepare(tmp_path, "data.trian=x.jsonl")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "prepare: data.trian is not a setting; did you mean data.train?" in done.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    from pretrain.data import prepare as prep

    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(prep, "_main", broken)
    with pytest.raises(KeyError):
        prep._task(None)


def test_utf8_offsets_across_block_edges(tmp_path):
    from pretrain.data.sources import first_bad_utf8_byte

    text = ("é" * 10).encode()  # two bytes each: every other block edge cuts a character
    path = write(tmp_path / "t.txt", text + b"\xff" + text)
    assert first_bad_utf8_byte(path, block=3) == 20
    assert first_bad_utf8_byte(write(tmp_path / "ok.txt", text), block=3) is None
    assert first_bad_utf8_byte(write(tmp_path / "cut.txt", text + b"\xc3"), block=3) == 20


@pytest.mark.slow
def test_mdlm_train_names_the_bad_line_too(tmp_path, tokenizer_dir):
    path = write(tmp_path / "bad.jsonl", jsonl({"text": "a"}) + b"{oops\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "pretrain", "mode=train", "model=tiny", "model.length=64",
         f"data.train={path}", f"data.valid={path}",
         f"data.tokenizer_name_or_path={tokenizer_dir}", f"data.cache_dir={tmp_path / 'c'}",
         f"checkpointing.save_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"mdlm: {path} line 2 is not valid JSON" in done.stderr
