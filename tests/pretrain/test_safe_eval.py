"""``mdlm mode=ppl_eval`` of a crafted release ``.ckpt`` never runs code from the file."""

import json
import os
import subprocess
import sys

import pytest

from model import Diffusion, ModelConfig
from tests.conftest import randomize_
from tests.model.test_checkpoint import release_config, word_tokenizer, write_release_ckpt
from tests.model.test_safe_load import PAYLOAD, add_payload

pytestmark = pytest.mark.slow

SMALL = ["mode=ppl_eval", "data=builtin", "model.length=64", "loader.eval_batch_size=16",
         "loader.num_workers=0", "shards.num_proc=1"]


def crafted(path, marker, where):
    """A release-layout .ckpt for the built-in tokenizer's vocabulary, with a payload."""
    config = ModelConfig(vocab_size=4097, mask_index=4096, length=64, hidden_size=64,
                         cond_dim=32, n_blocks=2, n_heads=4)
    model = randomize_(Diffusion(config), std=0.05)
    cfg = release_config(model={"name": "tiny", "type": "ddit", "hidden_size": 64,
                                "cond_dim": 32, "length": 64, "n_blocks": 2, "n_heads": 4,
                                "scale_by_sigma": True, "dropout": 0.0})
    write_release_ckpt(path, model.backbone, cfg,
                       [p.detach().clone() for p in model.backbone.parameters()],
                       word_tokenizer(with_mask=False))
    add_payload(path, marker, where)


def mdlm(run_dir, *overrides):
    env = dict(os.environ, MDLM_DATA_DIR=str(run_dir.parent / "data"))
    return subprocess.run([sys.executable, "-m", "pretrain", *SMALL, *overrides,
                           f"hydra.run.dir={run_dir}"], env=env, capture_output=True,
                          text=True, timeout=400)


def test_ppl_eval_of_a_crafted_ckpt_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    crafted(tmp_path / "beside.ckpt", marker, "top")
    done = mdlm(tmp_path / "a", f"eval.checkpoint_path={tmp_path / 'beside.ckpt'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists()
    reported = [line for line in done.stderr.splitlines() if PAYLOAD in line]
    assert len(reported) == 1 and reported[0].startswith("mdlm: note: ")
    assert "eval.trust_checkpoint=True" in reported[0] and PAYLOAD not in done.stdout
    assert json.loads((tmp_path / "a" / "ppl_eval.json").read_text())["tokens"] > 0

    crafted(tmp_path / "weights.ckpt", marker, "weights")
    done = mdlm(tmp_path / "b", f"eval.checkpoint_path={tmp_path / 'weights.ckpt'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mdlm: ") and PAYLOAD in last and "eval.trust_checkpoint=True" in last
    assert not marker.exists()
