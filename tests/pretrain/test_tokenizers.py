import pickle

import pytest

from model import tokenizer_ids
from pretrain.data.tokenizers import Text8Tokenizer, get_tokenizer, vocab_hash
from tests.pretrain.data_helpers import write_gpt2_style


def test_text8_character_tokenizer():
    tok = get_tokenizer("text8")
    assert isinstance(tok, Text8Tokenizer) and tok.vocab_size == 35
    assert tok("ab z", add_special_tokens=False)["input_ids"] == [8, 9, 34, 33]
    assert tok.decode([8, 9, 34, 33]) == "ab z"
    assert tokenizer_ids(tok) == dict(vocab_size=35, mask_index=4, bos_index=2, eos_index=3)
    assert tok.pad_token_id == 5


def gpt2_style_dir(tmp_path):
    """A byte-level BPE saved the way GPT-2's hub files are (tokenizer_class GPT2Tokenizer)."""
    directory = tmp_path / "gpt2-like"
    directory.mkdir()
    return write_gpt2_style(directory, ["hello world, the quick brown fox"] * 20, 300)


def test_gpt2_rule_mask_is_base_vocab_and_pad_shares_its_id(tmp_path):
    tok = get_tokenizer(str(gpt2_style_dir(tmp_path)))
    base = tok.vocab_size
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == base  # added after the vocab
    assert tokenizer_ids(tok) == dict(vocab_size=base + 1, mask_index=base, bos_index=0,
                                      eos_index=0)
    ids = tok("hello world")["input_ids"]
    assert ids[0] == ids[-1] == 0 and len(ids) > 2  # framed as BOS ... EOS
    assert 0 not in tok("hello world", add_special_tokens=False)["input_ids"]


def test_sentencepiece_model_file(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50
                              + ["pack my box with five dozen liquor jugs"] * 50))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    tok = get_tokenizer(str(tmp_path / "sp.model"))
    ids = tok("the lazy fox", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the lazy fox"
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.pad_token_id == 60
    assert tokenizer_ids(tok)["mask_index"] == 60
    clone = pickle.loads(pickle.dumps(tok))  # worker processes get a working copy
    assert clone("the lazy fox", add_special_tokens=False)["input_ids"] == ids
    assert vocab_hash(clone) == vocab_hash(tok)


def test_bert_style_falls_back_to_cls_and_sep():
    from tests.pretrain.data_helpers import word_tokenizer

    tok = word_tokenizer("bert")
    assert (tok.bos_token, tok.eos_token) == ("[CLS]", "[SEP]")
    assert tokenizer_ids(tok) == dict(vocab_size=45, mask_index=4, bos_index=2, eos_index=3)


def test_unknown_tokenizer_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="data.tokenizer_name_or_path="):
        get_tokenizer(str(tmp_path / "no-such-tokenizer"))
