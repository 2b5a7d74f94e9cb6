"""``python -m pretrain.report`` on a short real training run, alone and beside another."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from pretrain.report import read_metrics
from tests.pretrain.test_train import run_cli

pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tests.pretrain.test_tokenizers import gpt2_style_dir

    root = tmp_path_factory.mktemp("report")
    judge = gpt2_style_dir(root)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(AutoTokenizer.from_pretrained(str(judge))),
                               n_positions=128, n_embd=16, n_layer=1, n_head=2)
                    ).save_pretrained(str(judge))
    run = root / "run"
    done = run_cli(run, root / "data", "trainer.max_steps=4", "trainer.val_check_interval=2",
                   "sampling.steps=8", "sampling.num_sample_batches=1",
                   "loader.eval_batch_size=4", "sampling.predictor=ddpm_fast",
                   "eval.compute_generative_perplexity=True",
                   f"eval.gen_ppl_eval_model_name_or_path={judge}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def report(*args):
    done = subprocess.run([sys.executable, "-m", "pretrain.report", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_one_run(run_dir):
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(k in records[1] for k in ("val/nll", "val/entropy", "val/gen_ppl"))
    markdown = report(run_dir)
    out = run_dir / "report"
    assert markdown == str(out / "report.md")
    text = (out / "report.md").read_text()
    for name in ("loss.png", "training.png", "samples.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
        assert f"]({name})" in text
    assert "| run |" in text and f"| {run_dir.name} | 4 |" in text


def test_runs_side_by_side_one_still_going(run_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("report"))
    with open(other / "metrics.jsonl", "a") as f:  # a record being written right now
        f.write(json.dumps({"step": 5, "loss": 1.0, "tokens": 9})[:12])
    (other / "zero_shot.json").write_text(json.dumps({"zero_shot": {
        "ptb": {"ppl": 99.5, "nll": 4.6, "stderr": 0.01, "tokens": 1000}}}))
    (other / "samples_summary.json").write_text(json.dumps({
        "predictor": "first_hitting", "steps": 128, "mean_nfe": 64.0, "gen_ppl": 80.0,
        "entropy": 5.1, "mauve": 0.7, "samples_per_s": 2.0}))
    report(run_dir, other, "--out", tmp_path / "both")
    text = (tmp_path / "both" / "report.md").read_text()
    assert f"| {run_dir.name} | 4 |" in text and "| other | 4 |" in text
    assert "| ptb | 99.5 |" in text and "| first_hitting | 128 | 64 | 80 | 5.1 | 0.7 |" in text
    for name in ("loss.png", "training.png", "samples.png"):
        assert (tmp_path / "both" / name).read_bytes().startswith(PNG)


def test_a_resumed_run_keeps_the_last_value_of_a_step(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["loss"] for r in read_metrics(tmp_path)] == [3.0, 1.5]


def test_not_a_run_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pretrain.report", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"report: {tmp_path} has no metrics.jsonl; point "
                                   "pretrain.report at a run directory (checkpointing.save_dir "
                                   "of a training run).")
