"""Tokenizers: hub names and local directories, the text8 character tokenizer, sentencepiece
model files and the built-in corpus's BPE, all normalised as the MDLM release does.

After ``get_tokenizer``: BOS/EOS exist (CLS/SEP as fallback), GPT-2 frames a text as
BOS ... EOS when special tokens are added, and a pad token exists (GPT-2 gains ``[PAD]``,
id 50257, the same id as its mask token, which only pad mode ever writes).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import transformers

from pretrain.data.sources import DataError

TEXT8 = "text8"
BUILTIN = "builtin"


class Text8Tokenizer(transformers.PreTrainedTokenizer):
    """Character tokenizer of text8: 8 special tokens, then a-z and space."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, bos_token="[BOS]", eos_token="[EOS]", sep_token="[SEP]",
                 cls_token="[CLS]", pad_token="[PAD]", mask_token="[MASK]",
                 unk_token="[UNK]", **kwargs):
        self.characters = list("abcdefghijklmnopqrstuvwxyz ")
        self._vocab_str_to_int = {
            "[CLS]": 0, "[SEP]": 1, "[BOS]": 2, "[EOS]": 3, "[MASK]": 4, "[PAD]": 5,
            "[RESERVED]": 6, "[UNK]": 7,
            **{ch: i + 8 for i, ch in enumerate(self.characters)},
        }
        self._vocab_int_to_str = {v: k for k, v in self._vocab_str_to_int.items()}
        super().__init__(bos_token=bos_token, eos_token=eos_token, sep_token=sep_token,
                         cls_token=cls_token, pad_token=pad_token, mask_token=mask_token,
                         unk_token=unk_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab_str_to_int)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text.lower())

    def _convert_token_to_id(self, token: str) -> int:
        return self._vocab_str_to_int.get(token, self._vocab_str_to_int["[UNK]"])

    def _convert_id_to_token(self, index: int) -> str:
        return self._vocab_int_to_str[index]

    def convert_tokens_to_string(self, tokens) -> str:
        return "".join(tokens)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab_str_to_int)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        path = Path(save_directory) / f"{filename_prefix or ''}text8_vocab.json"
        path.write_text(json.dumps(self._vocab_str_to_int))
        return (str(path),)


class SentencePieceTokenizer(transformers.PreTrainedTokenizer):
    """A bare sentencepiece ``.model`` file as a tokenizer (its BOS/EOS/PAD/UNK pieces)."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, model_file: str, **kwargs):
        import sentencepiece

        self.model_file = str(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        piece = lambda i: self.sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        for key, index in (("bos_token", self.sp.bos_id()), ("eos_token", self.sp.eos_id()),
                           ("pad_token", self.sp.pad_id()), ("unk_token", self.sp.unk_id())):
            if piece(index) is not None:
                kwargs.setdefault(key, piece(index))
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens) -> str:
        return self.sp.decode_pieces(list(tokens))

    def save_vocabulary(self, save_directory, filename_prefix=None):
        import shutil

        path = Path(save_directory) / f"{filename_prefix or ''}spiece.model"
        shutil.copyfile(self.model_file, path)
        return (str(path),)

    def __reduce__(self):  # rebuilt from the model file in worker processes
        return (_sentencepiece_from_state, (self.model_file, [str(t) for t in
                                                             self.added_tokens_encoder]))


def _sentencepiece_from_state(model_file, added):
    tok = SentencePieceTokenizer(model_file)
    for token in added:
        if token not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": token} if token == "[PAD]" else
                                   {"additional_special_tokens": [token]})
    return tok


def _load(name_or_path: str, cache_dir: str | None):
    path = Path(name_or_path).expanduser()
    if name_or_path == TEXT8:
        return Text8Tokenizer()
    if name_or_path == BUILTIN:
        from pretrain.data.builtin import load_builtin_tokenizer

        return load_builtin_tokenizer(cache_dir)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(str(path))
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise DataError(
            f"data.tokenizer_name_or_path={name_or_path!r} could not be loaded "
            f"({type(err).__name__}); give a hub name (gpt2, bert-base-uncased), a local "
            "tokenizer directory, a sentencepiece .model file, 'text8' or 'builtin'."
        ) from err


def get_tokenizer(name_or_path: str, cache_dir: str | None = None):
    """Loads a tokenizer by hub name, directory, ``.model`` file, ``text8`` or ``builtin``,
    normalised as the release does (see ``normalize``)."""
    return normalize(_load(str(name_or_path), cache_dir), str(name_or_path))


def normalize(tokenizer, name: str = "tokenizer"):
    """BOS/EOS (falling back to CLS/SEP), BOS ... EOS framing for GPT-2, a pad token."""
    name_or_path = name
    if isinstance(tokenizer, (transformers.GPT2TokenizerFast, transformers.GPT2Tokenizer)):
        from tokenizers import processors

        tokenizer._tokenizer.post_processor = processors.BertProcessing(
            (tokenizer.bos_token, tokenizer.bos_token_id),
            (tokenizer.eos_token, tokenizer.eos_token_id),
        )
    if tokenizer.bos_token is None:
        if tokenizer.cls_token is None:
            raise DataError(f"tokenizer {name_or_path!r} has neither a BOS nor a CLS token; "
                             "use a tokenizer with one of them.")
        tokenizer.bos_token = tokenizer.cls_token
    if tokenizer.eos_token is None:
        if tokenizer.sep_token is None:
            raise DataError(f"tokenizer {name_or_path!r} has neither an EOS nor a SEP token; "
                             "use a tokenizer with one of them.")
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    return tokenizer


_HASHES = weakref.WeakKeyDictionary()  # tokenizer -> (its size and special ids, hash)


def vocab_hash(tokenizer) -> str:
    """A digest of the vocabulary and special-token ids: two tokenizers with the same hash
    map text to the same ids. Remembered per tokenizer while its size and special ids stay
    (a build asks several times; GPT-2's vocabulary takes about 0.1 s to hash)."""
    specials = {k: getattr(tokenizer, f"{k}_token_id", None)
                for k in ("bos", "eos", "pad", "mask", "cls", "sep", "unk")}
    key = (len(tokenizer), tuple(specials.values()))
    try:
        remembered = _HASHES.get(tokenizer)
    except TypeError:  # not weakly referable: hash every time
        remembered = None
    if remembered is not None and remembered[0] == key:
        return remembered[1]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps({"vocab": vocab, "specials": specials}, ensure_ascii=False)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    try:
        _HASHES[tokenizer] = (key, digest)
    except TypeError:
        pass
    return digest
