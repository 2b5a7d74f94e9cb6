"""MAUVE with a configurable featurizer (a tiny local GPT-2 here; gpt2-large for users)."""

import pytest
import torch

from evaluation import mauve_score
from evaluation.mauve import features, load_featurizer
from tests.pretrain.test_tokenizers import gpt2_style_dir


@pytest.fixture(scope="module")
def featurizer(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    directory = gpt2_style_dir(tmp_path_factory.mktemp("featurizer"))
    tok = AutoTokenizer.from_pretrained(str(directory))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(str(directory))
    return str(directory)


def test_batched_features_are_each_texts_own(featurizer):
    """Right padding changes nothing a causal featurizer sees: each text's feature is the
    last layer at its last token, as mauve-text computes it one text at a time."""
    model, tok = load_featurizer(featurizer)
    texts = ["hello world", "the quick brown fox hello world the fox", "fox"]
    ours = features(texts, model, tok, max_length=64, batch_size=3)
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(torch.from_numpy(ours[i]), hidden, rtol=1e-4, atol=1e-5)


def test_mauve_separates_the_same_distribution_from_another(featurizer):
    words = ["hello", "world", "the", "quick", "brown", "fox"]
    g = torch.Generator().manual_seed(0)

    def texts(n, vocab):
        picks = torch.randint(0, len(vocab), (n, 12), generator=g).tolist()
        return [" ".join(vocab[j] for j in row) for row in picks]

    same = mauve_score(texts(60, words), texts(60, words), featurizer)
    other = mauve_score(texts(60, words), texts(60, ["fox", "fox", "the"]), featurizer)
    assert same["mauve_featurizer"] == featurizer and same["mauve_references"] == 60
    assert 0.9 < same["mauve"] <= 1.0 and other["mauve"] < 0.5 * same["mauve"]
