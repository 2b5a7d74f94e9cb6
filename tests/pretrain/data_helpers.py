"""Small tokenizers and corpora built locally for the data tests."""

from __future__ import annotations

WORDS = [f"w{i}" for i in range(40)]


def word_tokenizer(kind: str = "gpt2"):
    """A word-level fast tokenizer, normalised as every run's tokenizer is: ``gpt2`` style
    (one end-of-text token used as BOS and EOS, no pad, no mask) or ``bert`` style
    ([CLS] ... [SEP] framing, [PAD], [MASK])."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from pretrain.data.tokenizers import normalize

    if kind == "gpt2":
        vocab = {w: i for i, w in enumerate(WORDS)} | {"<eot>": len(WORDS)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return normalize(PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<eot>",
                                                 eos_token="<eot>"))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return normalize(PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]"))


def write_gpt2_style(directory, texts: list[str], vocab_size: int):
    """A byte-level BPE trained on ``texts``, saved in ``directory`` the way GPT-2's hub
    files are (tokenizer_class GPT2Tokenizer, <|endoftext|> as BOS, EOS and UNK)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 1024}))
    return directory


def corpus(n_docs: int, seed: int = 0, max_words: int = 30) -> list[str]:
    import random

    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(1, max_words)))
            for _ in range(n_docs)]
