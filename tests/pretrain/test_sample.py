"""mode=sample_eval end to end on tiny local stand-ins."""

import json
import os
import subprocess
import sys

import pytest

from tests.pretrain.test_evaluate import SMALL, exported  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def sample_eval(tmp_path, *overrides):
    env = dict(os.environ, MDLM_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-m", "pretrain", "mode=sample_eval", *SMALL,
                           "loader.eval_batch_size=2", "sampling.num_sample_batches=2",
                           "sampling.steps=16", *overrides, f"hydra.run.dir={tmp_path}"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "samples_summary.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary  # printed last
    return records, summary


def test_diffusion_samples_with_generative_perplexity(tmp_path, exported):  # noqa: F811
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tests.pretrain.test_tokenizers import gpt2_style_dir

    judge = gpt2_style_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(judge))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1,
                               n_head=2)).save_pretrained(str(judge))
    records, summary = sample_eval(
        tmp_path / "run", f"eval.checkpoint_path={exported['mdlm']}",
        "sampling.predictor=ddpm_fast", "eval.compute_generative_perplexity=True",
        f"eval.gen_ppl_eval_model_name_or_path={judge}", "eval.compute_mauve=True",
        f"eval.mauve_featurizer={judge}", "sampling.top_p=0.9")
    assert len(records) == 4 and summary["samples"] == 4
    for r in records:
        assert set(r) == {"text", "token_ids", "nfe", "seconds"} and len(r["token_ids"]) == 64
        assert 4096 not in r["token_ids"]  # nothing left masked
    assert 0 < summary["mean_nfe"] <= 17 and summary["samples_per_s"] > 0
    assert summary["gen_ppl"] > 1 and summary["entropy"] > 0 and summary["judge"] == str(judge)
    # MAUVE beside them, against as many validation texts, under the chosen featurizer
    assert 0 < summary["mauve"] <= 1 and summary["mauve_references"] == 4
    assert summary["mauve_featurizer"] == str(judge) and summary["top_p"] == 0.9


def test_ar_and_semi_ar(tmp_path, exported):  # noqa: F811
    records, summary = sample_eval(tmp_path / "ar", f"eval.checkpoint_path={exported['ar']}",
                                   "backbone=ar", "parameterization=ar")
    assert all(len(r["token_ids"]) == 64 and r["nfe"] == 63 for r in records)
    assert summary["predictor"] == "ar"
    records, _ = sample_eval(tmp_path / "semi", f"eval.checkpoint_path={exported['mdlm']}",
                             "sampling.semi_ar=True", "sampling.stride_length=16",
                             "sampling.num_strides=2")
    assert all(len(r["token_ids"]) == 64 + 2 * 16 for r in records)
    # a predictor added since the release, semi-AR, from the command line
    records, summary = sample_eval(tmp_path / "remdm", f"eval.checkpoint_path={exported['mdlm']}",
                                   "sampling.semi_ar=True", "sampling.stride_length=16",
                                   "sampling.num_strides=1", "sampling.predictor=remdm-loop")
    assert all(len(r["token_ids"]) == 64 + 16 and 4096 not in r["token_ids"] for r in records)
    assert summary["predictor"] == "remdm-loop"
