"""Where documents come from: the release's dataset recipes, the built-in corpus and local
files, each giving the raw texts of one split (detokenized as the release does)."""

from __future__ import annotations

import json
import os
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pretrain.data import builtin, detokenizers

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
OWT_VALID_DOCS = 100_000
# character ranges of the text8 splits (those of the D3PM codebase)
TEXT8_SPLITS = {"train": (0, 90_000_000), "validation": (90_000_000, 95_000_000),
                "test": (95_000_000, None)}

# name -> (HF dataset path, config name, text column)
HF_RECIPES = {
    "openwebtext": ("Skylion007/openwebtext", None, "text"),
    "openwebtext-train": ("Skylion007/openwebtext", None, "text"),
    "openwebtext-valid": ("Skylion007/openwebtext", None, "text"),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": ("ptb_text_only", None, "sentence"),
    "lm1b": ("lm1b", None, "text"),
    "ag_news": ("fancyzhx/ag_news", None, "text"),
    "scientific_papers_arxiv": ("scientific_papers", "arxiv", "article"),
    "scientific_papers_pubmed": ("scientific_papers", "pubmed", "article"),
}
RECIPES = sorted([*HF_RECIPES, "lambada", "text8", "text8-crop", "builtin"])


def validation_split(name: str) -> str:
    """The split the release validates on: test for lm1b, text8 and ag_news, the whole set
    for lambada and openwebtext-valid, validation otherwise."""
    if name in ("text8", "text8-crop", "lm1b", "ag_news"):
        return "test"
    return "validation"


@dataclass
class Source:
    """The texts of one split. ``texts(start)`` yields them from document ``start`` on."""

    name: str
    split: str
    dataset: object  # a list of str, an HF Dataset or an HF IterableDataset
    column: str | None = None
    detokenizer: object = None

    @property
    def num_docs(self) -> int | None:
        try:
            return len(self.dataset)
        except TypeError:  # streaming
            return None

    def texts(self, start: int = 0) -> Iterator[str]:
        data = self.dataset
        if isinstance(data, list):
            items = iter(data[start:])
        elif self.num_docs is None:
            items = (row[self.column] for row in data.skip(start))
        else:
            items = _dataset_column(data, self.column, start)
        for text in items:
            yield self.detokenizer(text) if self.detokenizer else text


def _dataset_column(data, column: str, start: int, batch: int = 10_000) -> Iterator[str]:
    for i in range(start, len(data), batch):
        yield from data[i:i + batch][column]


def is_local(name: str) -> bool:
    return os.path.exists(os.path.expanduser(str(name)))


def open_source(name: str, split: str, cache_dir: str, streaming: bool = False,
                block_size: int = 1024) -> Source:
    """The documents of dataset ``name`` (a recipe, ``builtin`` or a local path) for ``split``
    (``train`` or the recipe's validation split)."""
    if is_local(name):
        return Source(name, split, read_local(Path(os.path.expanduser(name))))
    if name == "builtin":
        return Source(name, split, builtin.documents(split))
    if name in ("text8", "text8-crop"):
        return Source(name, split, text8_documents(cache_dir, split, block_size,
                                                   crop_train=name == "text8-crop"))
    detok = detokenizers.for_dataset(name)
    if name == "lambada":
        return Source(name, split, _load_hf("json", None, cache_dir, streaming,
                                           data_files=LAMBADA_URL, split="train"),
                      "text", detok)
    path, config, column = HF_RECIPES.get(name, (name, None, "text"))
    if name == "openwebtext-train":
        hf_split = f"train[:-{OWT_VALID_DOCS}]"
    elif name == "openwebtext-valid":
        hf_split = f"train[-{OWT_VALID_DOCS}:]"
    else:
        hf_split = split
    if streaming and name.startswith("openwebtext-"):
        raise ValueError(f"data.train={name} slices the last {OWT_VALID_DOCS} documents off, "
                         "which a streamed dataset cannot do; set data.streaming=False.")
    dataset = _load_hf(path, config, cache_dir, streaming, split=hf_split)
    return Source(name, split, dataset, column, detok)


# The hub's automatic Parquet export of every dataset, one directory per config: what
# remains loadable of the script-based recipes (lm1b, ptb_text_only, scientific_papers)
# under datasets >= 4, which no longer runs loading scripts.
PARQUET_EXPORT = "refs/convert/parquet"


def _load_hf(path, config, cache_dir, streaming, **kwargs):
    import datasets

    common = dict(cache_dir=os.path.expanduser(cache_dir), streaming=streaming, **kwargs)
    try:
        return datasets.load_dataset(path, config, **common)
    except Exception as err:  # network, unknown name, missing split: one sentence
        first = err
    if "script" in str(first).lower() or "trust_remote_code" in str(first):
        try:
            return datasets.load_dataset(path, data_dir=config, revision=PARQUET_EXPORT,
                                         **common)
        except Exception as err:
            first = err
    raise ValueError(
        f"could not load dataset {path!r}{f' ({config})' if config else ''} split "
        f"{kwargs.get('split')!r}: {type(first).__name__}: {str(first)[:200]}; point "
        "data.train / data.valid at a local copy (.parquet, .jsonl, .txt) instead."
    ) from first


def read_local(path: Path) -> list[str]:
    """Documents of a local file or directory: a directory's .txt files are one document
    each; a single .txt file holds one document per blank-line-separated paragraph;
    .jsonl/.json rows and .parquet rows give their ``text`` field."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{path} holds no {'/'.join(LOCAL_SUFFIXES)} files.")
        docs = []
        for f in files:
            docs.extend([f.read_text(encoding="utf-8").strip()] if f.suffix == ".txt"
                        else read_local(f))
        return docs
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if path.suffix in (".jsonl", ".json"):
        return _json_texts(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"{path} has no 'text' column (columns: {table.column_names}).")
        return [str(t) for t in table.column("text").to_pylist()]
    raise ValueError(f"{path} is not a {'/'.join(LOCAL_SUFFIXES)} file or a directory.")


def _json_texts(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8").strip()
    if path.suffix == ".json" and raw.startswith("["):
        rows = json.loads(raw)
    else:
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    try:
        return [row["text"] for row in rows]
    except (KeyError, TypeError):
        raise ValueError(f"{path}: every row needs a 'text' field.") from None


def text8_documents(cache_dir: str, split: str, block_size: int, crop_train: bool) -> list[str]:
    """text8 cut into chunks of ``block_size`` characters (twice that for the text8-crop
    training split), the last incomplete chunk dropped; splits 90M / 5M / 5M characters."""
    raw_dir = Path(os.path.expanduser(cache_dir)) / "text8" / "raw_data"
    zip_path = raw_dir / "text8.zip"
    if not zip_path.is_file():
        raw_dir.mkdir(parents=True, exist_ok=True)
        tmp = zip_path.with_suffix(".zip.part")
        with urllib.request.urlopen(TEXT8_URL) as response, open(tmp, "wb") as out:
            out.write(response.read())
        os.replace(tmp, zip_path)
    with zipfile.ZipFile(zip_path) as z:
        data = z.read("text8").decode("utf-8")
    lo, hi = TEXT8_SPLITS[split]
    text = data[lo:hi]
    size = 2 * block_size if (split == "train" and crop_train) else block_size
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    if chunks and len(chunks[-1]) < size:
        chunks = chunks[:-1]
    return chunks
