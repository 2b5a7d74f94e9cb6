"""mode=sample_eval's pieces in-process: every predictor, semi-AR or not, through ``draw``;
semi-AR samples scored over their full length; texts decoded as the release's judge read
them."""

import pytest
import torch
from omegaconf import OmegaConf

import pretrain.sample as S
from model import Diffusion
from sampling import PREDICTORS
from tests.conftest import randomize_, tiny_config


def cfg_for(**sampling):
    base = OmegaConf.load("pretrain/config/config.yaml")
    return OmegaConf.create({
        "parameterization": "subs", "time_conditioning": False,
        "noise": {"type": "loglinear"}, "model": {"length": 12},
        "sampling": OmegaConf.to_container(base.sampling) | sampling,
        "eval": {"gen_ppl_eval_model_name_or_path": "judge", "perplexity_batch_size": 2}})


@pytest.mark.parametrize("predictor", sorted(PREDICTORS))
def test_every_predictor_draws_with_and_without_semi_ar(predictor):
    model = randomize_(Diffusion(tiny_config()), std=0.1).eval()
    g = torch.Generator().manual_seed(0)
    rows, nfe = S.draw(model, cfg_for(predictor=predictor, steps=6, top_p=0.9), 3, g, 0)
    tokens = torch.tensor(rows)
    assert tokens.shape == (3, 12) and nfe > 0 and bool((tokens != 22).all())
    rows, nfe = S.draw(model, cfg_for(predictor=predictor, steps=6, semi_ar=True,
                                      stride_length=4, num_strides=2), 3, g, 0)
    tokens = torch.tensor(rows)
    assert tokens.shape == (3, 12 + 2 * 4) and bool((tokens != 22).all())


def test_ar_draw_takes_top_p_and_temperature():
    model = randomize_(Diffusion(tiny_config(backbone="ar", parameterization="ar")),
                       std=0.3).eval()
    cfg = cfg_for(top_p=0.5, temperature=0.7)
    cfg.parameterization = "ar"
    a, nfe = S.draw(model, cfg, 2, torch.Generator().manual_seed(0), 1)
    b, _ = S.draw(model, cfg_for(), 2, torch.Generator().manual_seed(0), 1)
    assert nfe == 11 and a != b


def test_semi_ar_samples_are_judged_over_their_full_length(monkeypatch):
    seen = []
    monkeypatch.setattr(S, "judge", lambda name, device: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(S, "generative_perplexity", lambda texts, model, tok, max_length,
                        **kw: seen.append(max_length) or {"gen_ppl": 2.0})
    cfg = cfg_for()
    S.score_samples(["a b"], [list(range(12 + 3 * 4))], cfg, "cpu")
    S.score_samples(["a b"], [list(range(12))], cfg, "cpu")
    assert seen == [24, 12]


def test_texts_are_decoded_with_clean_tokenization_spaces(tmp_path):
    from transformers import AutoTokenizer

    from tests.pretrain.test_tokenizers import gpt2_style_dir

    tok = AutoTokenizer.from_pretrained(str(gpt2_style_dir(tmp_path)))
    ids = tok("hello , world . the fox 's", add_special_tokens=False)["input_ids"]
    assert S.decode(tok, [ids]) == ["hello, world. the fox's"]  # as transformers 4.38 did
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == "hello , world . the fox 's"


@pytest.mark.parametrize("change,named", [
    ({"mauve_featurizer": ""}, "eval.mauve_featurizer"),
    ({"mauve_max_length": 0}, "eval.mauve_max_length=0"),
    ({"mauve_scaling_factor": -1}, "eval.mauve_scaling_factor=-1"),
])
def test_mauve_settings_are_checked(change, named):
    from model.errors import UserError

    cfg = cfg_for()
    cfg.eval = OmegaConf.create({"compute_mauve": True, "mauve_featurizer": "gpt2-large",
                                 "mauve_max_length": 1024, "mauve_scaling_factor": 5.0}
                                | change)
    with pytest.raises(UserError, match=named):
        S.check_mauve(cfg)
    cfg.eval.compute_mauve = False
    S.check_mauve(cfg)  # off: nothing to check


@pytest.mark.parametrize("var_length", [False, True])
def test_block_diffusion_draws_rows_of_the_length_asked(var_length):
    model = randomize_(Diffusion(tiny_config(parameterization="bd3lm", block_size=4)),
                       std=0.1).eval()
    cfg = cfg_for(predictor="first_hitting", var_length=var_length)
    cfg.parameterization, cfg.model.length = "bd3lm", 24  # twice the model's context
    rows, nfe = S.draw(model, cfg, 2, torch.Generator().manual_seed(0), 0)
    assert len(rows) == 2 and all(len(r) == 24 for r in rows) and nfe == 24
    assert all(22 not in r for r in rows)
