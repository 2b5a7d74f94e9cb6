"""Periodic validation scores samples many times in a run; the judge is read once."""

import torch
from omegaconf import OmegaConf

import pretrain.sample as S


def test_judge_is_loaded_once_per_run(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tests.pretrain.test_tokenizers import gpt2_style_dir

    judge = gpt2_style_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(judge))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(str(judge))
    loads = []
    original = S.load_judge

    def counting(name, device=None):
        loads.append(name)
        return original(name, device)

    monkeypatch.setattr(S, "_JUDGES", {})
    monkeypatch.setattr(S, "load_judge", counting)
    cfg = OmegaConf.create({"model": {"length": 32}, "eval": {
        "gen_ppl_eval_model_name_or_path": str(judge), "perplexity_batch_size": 2}})
    texts, ids = ["hello world", "the cat"], [[1, 2, 3], [4, 5, 6]]
    first = S.score_samples(texts, ids, cfg, torch.device("cpu"))
    second = S.score_samples(texts, ids, cfg, torch.device("cpu"))
    assert loads == [str(judge)]
    assert first["gen_ppl"] == second["gen_ppl"] > 1
