"""Where documents come from: the release's dataset recipes, the built-in corpus and local
files, each giving the raw texts of one split (detokenized as the release does)."""

from __future__ import annotations

import itertools
import json
import os
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError
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


class DataError(UserError):
    """A data file or dataset that is missing, unreadable or malformed."""


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

    @property
    def known_docs(self) -> int | None:
        """The number of documents when it is known without reading the split."""
        if isinstance(self.dataset, LocalCorpus):
            return self.dataset.cheap_len()
        return self.num_docs

    def texts(self, start: int = 0) -> Iterator[str]:
        data = self.dataset
        if isinstance(data, LocalCorpus):
            items = data.texts(start)
        elif isinstance(data, list):
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


def looks_like_path(name: str) -> bool:
    """A name meant as a local file: a data-file suffix or an explicit directory prefix."""
    name = str(name)
    return name.endswith(LOCAL_SUFFIXES) or name.startswith(("/", "./", "../", "~"))


def open_source(name: str, split: str, cache_dir: str, streaming: bool = False,
                block_size: int = 1024) -> Source:
    """The documents of dataset ``name`` (a recipe, ``builtin`` or a local path) for ``split``
    (``train`` or the recipe's validation split)."""
    if is_local(name):
        return Source(name, split, LocalCorpus(Path(os.path.expanduser(name))))
    if looks_like_path(name):
        raise DataError(f"data file {name} does not exist; check the path given to "
                        "data.train / data.valid (or name a dataset recipe).")
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
        raise DataError(f"data.train={name} slices the last {OWT_VALID_DOCS} documents off, "
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
    raise DataError(
        f"could not load dataset {path!r}{f' ({config})' if config else ''} split "
        f"{kwargs.get('split')!r}: {type(first).__name__}: {str(first)[:200]}; point "
        "data.train / data.valid at a local copy (.parquet, .jsonl, .txt) instead."
    ) from first


def read_local(path: Path) -> list[str]:
    """All documents of a local file or directory (see ``LocalCorpus``), as a list."""
    return list(LocalCorpus(Path(path)).texts())


class LocalCorpus:
    """Documents of a local file or directory, streamed: a directory's .txt files are one
    document each; a single .txt file holds one document per blank-line-separated paragraph;
    .jsonl/.json rows and .parquet rows give their ``text`` field. Nothing holds the split:
    ``texts(start)`` reads the files as it goes. Mistakes in a file (not UTF-8, a malformed
    line, no ``text`` field) stop with a ``DataError`` naming the file and where."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*")
                                if p.suffix in LOCAL_SUFFIXES and p.is_file())
            if not self.files:
                raise DataError(f"{self.path} holds no {'/'.join(LOCAL_SUFFIXES)} files; "
                                "point data.train / data.valid at a directory that does.")
        elif self.path.suffix in LOCAL_SUFFIXES:
            self.files = [self.path]
        else:
            raise DataError(f"{self.path} is not a {'/'.join(LOCAL_SUFFIXES)} file or a "
                            "directory; convert it to one of them.")
        self._count = None

    def texts(self, start: int = 0) -> Iterator[str]:
        whole_files = self.path.is_dir()
        docs = (doc for f in self.files for doc in
                (_whole_text(f) if whole_files and f.suffix == ".txt" else _file_texts(f)))
        return itertools.islice(docs, start, None)

    def cheap_len(self) -> int | None:
        """The number of documents when counting them costs no parsing (.jsonl, .parquet,
        a directory's .txt files)."""
        cheap = (".jsonl", ".parquet", ".txt") if self.path.is_dir() else (".jsonl", ".parquet")
        if any(f.suffix not in cheap for f in self.files):
            return None if self._count is None else self._count
        return len(self)

    def __len__(self) -> int:
        if self._count is None:
            self._count = sum(_count_docs(f, self.path.is_dir()) for f in self.files)
        return self._count


def _count_docs(path: Path, whole_files: bool) -> int:
    if whole_files and path.suffix == ".txt":
        return 1
    if path.suffix == ".parquet":
        return _parquet_file(path).metadata.num_rows
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return sum(1 for _ in _file_texts(path))


def _whole_text(path: Path) -> Iterator[str]:
    try:
        yield path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _file_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        return _paragraphs(path)
    if path.suffix == ".parquet":
        return _parquet_texts(path)
    with open(path, "rb") as f:
        array = path.suffix == ".json" and f.read(4096).lstrip().startswith(b"[")
    return _json_array_texts(path) if array else _jsonl_texts(path)


def _paragraphs(path: Path) -> Iterator[str]:
    """Blank-line-separated paragraphs, stripped, with universal newlines (as ``read_text``)."""
    lines = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line == "\n":
                    if text := "".join(lines).strip():
                        yield text
                    lines = []
                else:
                    lines.append(line)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    if text := "".join(lines).strip():
        yield text


def _jsonl_texts(path: Path) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number} is not valid JSON ({err.msg}, column "
                                f"{err.colno}); fix or remove that line (one JSON object "
                                'with a "text" field per line).') from None
            yield _text_field(row, path, f"line {number}")


def _json_array_texts(path: Path) -> Iterator[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start) from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno} is not valid JSON ({err.msg}, column "
                        f"{err.colno}); fix the file (a JSON array of objects with a "
                        '"text" field).') from None
    for i, row in enumerate(rows):
        yield _text_field(row, path, f"row {i + 1}")


def _text_field(row, path: Path, where: str) -> str:
    try:
        text = row["text"]
    except (KeyError, TypeError, IndexError):
        text = None
    if not isinstance(text, str):
        raise DataError(f"{path} {where} has no string 'text' field; every row needs one "
                        '(e.g. {"text": "..."}).')
    return text


def _unreadable_parquet(path: Path, err: Exception) -> DataError:
    return DataError(f"{path} is not a readable parquet file ({type(err).__name__}); "
                     "rewrite it with pyarrow or use .jsonl.")


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # not a parquet file, or its footer is damaged
        raise _unreadable_parquet(path, err) from None


def _parquet_texts(path: Path) -> Iterator[str]:
    table = _parquet_file(path)
    columns = table.schema_arrow.names
    if "text" not in columns:
        raise DataError(f"{path} has no 'text' column (columns: {columns}); rename the "
                        "column holding the documents to 'text'.")
    batches = table.iter_batches(batch_size=1000, columns=["text"])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # a damaged page
            raise _unreadable_parquet(path, err) from None
        yield from (str(t) for t in batch.column(0).to_pylist())


def first_bad_utf8_byte(path: Path, block: int = 1 << 20) -> int | None:
    """The byte offset of the first byte of ``path`` that is not UTF-8, or None."""
    offset, tail = 0, b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            data = tail + chunk
            try:
                data.decode("utf-8")
                offset, tail = offset + len(data), b""
            except UnicodeDecodeError as err:
                if chunk and err.reason == "unexpected end of data":  # cut by the block edge
                    offset, tail = offset + err.start, data[err.start:]
                else:
                    return offset + err.start
            if not chunk:
                return None


def _not_utf8(path: Path, offset: int | None = None) -> DataError:
    if offset is None:
        offset = first_bad_utf8_byte(path)
    return DataError(f"{path} is not UTF-8 text: byte {offset} cannot be decoded; convert "
                     "the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`).")


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
