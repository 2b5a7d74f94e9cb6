"""The built-in corpus: CPython's bundled documentation (``pydoc_data.topics``), one document
per topic, with a byte-level BPE tokenizer trained on its training split. Needs no network."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

VOCAB_SIZE = 4096
END_OF_TEXT = "<|endoftext|>"
TOKENIZER_DIR = "builtin-tokenizer"


def documents(split: str) -> list[str]:
    """Topics sorted by name; every tenth topic (index 9, 19, ...) is the validation split."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held_out = {i for i in range(len(names)) if i % 10 == 9}
    keep = held_out if split != "train" else set(range(len(names))) - held_out
    return [topics[names[i]].strip() for i in sorted(keep)]


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=END_OF_TEXT,
                                   eos_token=END_OF_TEXT, unk_token=None)


def tokenizer_path(cache_dir) -> Path:
    return Path(os.path.expanduser(str(cache_dir))) / TOKENIZER_DIR


def load_builtin_tokenizer(cache_dir):
    """Loads the built-in BPE from ``cache_dir``, training and saving it there first if needed
    (written to a temporary directory and renamed, so a half-written one is never read)."""
    from transformers import PreTrainedTokenizerFast

    if cache_dir is None:
        from pretrain.data.sources import DataError

        raise DataError("data.tokenizer_name_or_path=builtin needs data.cache_dir to store "
                         "the trained tokenizer; set data.cache_dir.")
    path = tokenizer_path(cache_dir)
    if not (path / "tokenizer.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".builtin-tokenizer-"))
        train_tokenizer(documents("train")).save_pretrained(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another process published it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(path))
