import math

import pytest
import torch

from evaluation import generative_perplexity, load_judge, unigram_entropy
from tests.pretrain.test_tokenizers import gpt2_style_dir


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny GPT-2 and its byte-level tokenizer saved locally, loaded like a hub judge."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    directory = gpt2_style_dir(tmp_path_factory.mktemp("judge"))
    tok = AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32,
                                       n_layer=2, n_head=2, eos_token_id=0, bos_token_id=0))
    model.save_pretrained(str(directory))
    return directory


def direct(texts, model, tok, max_length):
    """Each text on its own, unpadded: targets that are not EOS, plus the first EOS (a real
    one, or the EOS that padding to the longest text puts after a shorter text)."""
    eos = tok.eos_token_id
    encoded = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    longest = max(len(e) for e in encoded)
    total, count = 0.0, 0
    for ids in encoded:
        seq = ids + [eos] if len(ids) < longest else ids
        x = torch.tensor([seq])
        with torch.no_grad():
            logp = model(x).logits.float().log_softmax(-1)[0]
        first = seq.index(eos) if eos in seq else None
        for j in range(1, len(seq)):
            if seq[j] != eos or j == first:
                total += -float(logp[j - 1, seq[j]])
                count += 1
    return total / count, count


def test_matches_a_direct_computation(judge_dir):
    model, tok = load_judge(str(judge_dir))
    assert tok.pad_token_id == tok.eos_token_id == 0
    texts = ["hello world, the quick brown fox",  # no EOS, the longest
             "the fox<|endoftext|> hello",  # one EOS
             "hello<|endoftext|>world<|endoftext|>",  # two EOS
             "brown",  # short: padded
             "quick brown<|endoftext|>"]
    result = generative_perplexity(texts, model, tok, max_length=40, batch_size=2,
                                   name="tiny-gpt2")
    nll, count = direct(texts, model, tok, max_length=40)
    assert result["gen_tokens"] == count
    assert result["gen_nll"] == pytest.approx(nll, rel=1e-5)
    assert result["gen_ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert result["judge"] == "tiny-gpt2"
    # every sample counts: a batch size that leaves a partial last batch changes nothing
    again = generative_perplexity(texts, model, tok, max_length=40, batch_size=3)
    assert again["gen_nll"] == pytest.approx(result["gen_nll"], rel=1e-6)


def test_truncation_to_model_length(judge_dir):
    model, tok = load_judge(str(judge_dir))
    texts = ["hello world, the quick brown fox " * 4, "brown fox"]
    result = generative_perplexity(texts, model, tok, max_length=6)
    nll, count = direct(texts, model, tok, max_length=6)
    assert result["gen_nll"] == pytest.approx(nll, rel=1e-5) and result["gen_tokens"] == count


def test_unigram_entropy():
    assert unigram_entropy([[1, 1, 2, 2], [3, 3, 3, 3]]) == pytest.approx(math.log(2) / 2)
    assert unigram_entropy(torch.tensor([[0, 1, 2, 3]])) == pytest.approx(math.log(4))
