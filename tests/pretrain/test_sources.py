import json
import zipfile

import pytest

from pretrain.data import sources
from pretrain.data.prepare import BuildSpec, build
from pretrain.data.sources import open_source, validation_split
from tests.pretrain.data_helpers import corpus, word_tokenizer
from tests.pretrain.test_prepare import shard_bytes


def test_validation_splits_follow_the_release():
    assert [validation_split(n) for n in ("lm1b", "text8", "ag_news")] == ["test"] * 3
    assert [validation_split(n) for n in ("wikitext2", "wikitext103", "ptb",
                                          "scientific_papers_arxiv")] == ["validation"] * 4


@pytest.fixture
def hub_standin(tmp_path, monkeypatch):
    """Recipes read a local JSON-lines file through the same datasets calls (streamed or
    not) in place of the hub."""
    import datasets

    path = tmp_path / "wiki.jsonl"
    docs = [t.replace(" ", " @-@ ", 1) for t in corpus(45, seed=3)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))

    def load(name, config, cache_dir, streaming, split=None, **kw):
        return datasets.load_dataset("json", data_files=str(path), split="train",
                                     streaming=streaming)

    monkeypatch.setattr(sources, "_load_hf", load)
    return docs


def test_recipe_detokenizes(hub_standin, tmp_path):
    source = open_source("wikitext2", "validation", str(tmp_path))
    texts = list(source.texts())
    assert source.num_docs == 45 and texts[0] == hub_standin[0].replace(" @-@ ", "-")
    assert list(source.texts(40)) == texts[40:]


def test_streaming_build_equals_the_materialised_one_and_resumes(hub_standin, tmp_path):
    tok = word_tokenizer("gpt2")

    def spec(root, streaming):
        return BuildSpec("wikitext2", "train", "words", 8, True, str(tmp_path / root),
                         streaming=streaming, docs_per_shard=10)

    reference = build(spec("a", False), tok, progress=False)
    streamed = spec("b", True)
    build(streamed, tok, progress=False, stop_after=2)
    resumed = build(streamed, tok, progress=False)
    assert shard_bytes(resumed) == shard_bytes(reference)


def test_text8_chunks(tmp_path, monkeypatch):
    raw = tmp_path / "text8" / "raw_data"
    raw.mkdir(parents=True)
    text = "".join("abcdefghij klmnopqrstuvwxyz"[i % 27] for i in range(100))
    with zipfile.ZipFile(raw / "text8.zip", "w") as z:
        z.writestr("text8", text)
    monkeypatch.setattr(sources, "TEXT8_SPLITS", {"train": (0, 70), "validation": (70, 85),
                                                  "test": (85, None)})
    assert open_source("text8", "train", str(tmp_path), block_size=16).dataset == [
        text[0:16], text[16:32], text[32:48], text[48:64]]  # 6 characters dropped
    assert open_source("text8", "test", str(tmp_path), block_size=5).dataset == [
        text[85:90], text[90:95], text[95:100]]
    crop = open_source("text8-crop", "train", str(tmp_path), block_size=16).dataset
    assert crop == [text[0:32], text[32:64]]


def test_streamed_openwebtext_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.streaming=False"):
        open_source("openwebtext-valid", "validation", str(tmp_path), streaming=True)


def test_script_datasets_fall_back_to_the_hubs_parquet_export(tmp_path, monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, name=None, **kw):
        calls.append((path, name, kw.get("data_dir"), kw.get("revision"), kw["split"]))
        if kw.get("revision") is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found "
                               "scientific_papers.py")
        return ["a paper"]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = sources.open_source("scientific_papers_arxiv", "test", str(tmp_path))
    assert list(source.texts()) == ["a paper"]
    assert calls == [("scientific_papers", "arxiv", None, None, "test"),
                     ("scientific_papers", None, "arxiv", "refs/convert/parquet", "test")]

    def offline(path, name=None, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load dataset 'lm1b'.*local copy"):
        sources.open_source("lm1b", "train", str(tmp_path))
