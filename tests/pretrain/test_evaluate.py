"""mode=ppl_eval end to end: one and two ranks, zero-shot tables, our own exports."""

import json
import os
import subprocess
import sys

import pytest
import torch

from model import Diffusion, ModelConfig, save_pretrained
from tests.conftest import randomize_
from tests.pretrain.test_train import command

pytestmark = pytest.mark.slow

SMALL = ["data=builtin", "model.length=64", "loader.eval_batch_size=8", "loader.num_workers=0",
         "shards.num_proc=1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, changes in (("mdlm", {}), ("ar", dict(backbone="ar", parameterization="ar")),
                          ("bd3lm", dict(parameterization="bd3lm", block_size=4))):
        torch.manual_seed(0)
        model = Diffusion(ModelConfig(vocab_size=4097, mask_index=4096, length=64,
                                      hidden_size=64, cond_dim=32, n_blocks=2, n_heads=4,
                                      **changes))
        out[name] = save_pretrained(randomize_(model, std=0.05), root / name)
    return out


def ppl_eval(tmp_path, data_dir, *overrides, ranks=1):
    env = dict(os.environ, MDLM_DATA_DIR=str(data_dir))
    args = ["mode=ppl_eval", *SMALL, *overrides]
    if ranks == 1:
        cmd = [sys.executable, "-m", "pretrain", *args, f"hydra.run.dir={tmp_path}"]
    else:
        cmd = command(tmp_path, *args, ranks=ranks)
        cmd = [c for c in cmd if not c.startswith(("data=builtin", "model.length=64",
                                                   "model.hidden", "model.n_", "model.cond",
                                                   "loader.", "trainer.", "optim.",
                                                   "lr_scheduler.", "shards."))] + SMALL
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_one_and_two_ranks_agree(tmp_path, exported):
    data = tmp_path / "data"
    results = {}
    for name, extra in (("mdlm", []), ("ar", ["backbone=ar", "parameterization=ar"])):
        for ranks in (1, 2):
            run = tmp_path / f"{name}{ranks}"
            ppl_eval(run, data, f"eval.checkpoint_path={exported[name]}", *extra, ranks=ranks)
            results[name, ranks] = json.loads((run / "ppl_eval.json").read_text())
    for name in ("mdlm", "ar"):
        one, two = results[name, 1], results[name, 2]
        assert two["nll"] == pytest.approx(one["nll"], rel=1e-12)
        assert two["tokens"] == one["tokens"] > 0
    assert results["ar", 1]["stderr"] == 0 and results["mdlm", 1]["stderr"] > 0
    assert results["mdlm", 1]["split"] == "validation"


@pytest.mark.parametrize("family", ["mdlm", "bd3lm"])
def test_zero_shot_writes_a_table(tmp_path, exported, family):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("alpha", "beta"):
        (docs / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": f"Return the {name} value of x, as the built-ins do. {i}"}) + "\n"
            for i in range(40)))
    ppl_eval(tmp_path / "run", tmp_path / "data", f"eval.checkpoint_path={exported[family]}",
             *(["parameterization=bd3lm"] if family == "bd3lm" else []), "eval.zero_shot=True",
             f"eval.zero_shot_datasets=[{docs / 'alpha.jsonl'},{docs / 'beta.jsonl'}]")
    result = json.loads((tmp_path / "run" / "zero_shot.json").read_text())["zero_shot"]
    assert len(result) == 2 and all(r["nll"] > 0 for r in result.values())
    # block diffusion's bound, block by block, with its Monte Carlo standard error
    parameterization = {"mdlm": "subs", "bd3lm": "bd3lm"}[family]
    assert all(r["parameterization"] == parameterization and r["stderr"] > 0
               for r in result.values())
    table = (tmp_path / "run" / "zero_shot.md").read_text()
    assert table.startswith("| Model |") and table.count("≤") == 2


def test_vocabulary_mismatch_is_named(tmp_path, exported):
    env = dict(os.environ, MDLM_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-m", "pretrain", "mode=ppl_eval", *SMALL,
                           f"eval.checkpoint_path={exported['mdlm']}",
                           "data.tokenizer_name_or_path=text8", f"hydra.run.dir={tmp_path}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "use the checkpoint's tokenizer" in done.stderr
