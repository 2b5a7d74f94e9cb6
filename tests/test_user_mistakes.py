"""Everyday mistakes, tried as a new user would: each ends the command with exit status 2
and one line naming the offending value or path, never a traceback. Across ``mdlm``'s
modes and ``python -m pretrain.data.prepare``; the data-file mistakes of ``prepare`` are
covered one by one in tests/pretrain/test_data_errors.py."""

import os
import subprocess
import sys

import pytest

from tests.conftest import CPU_ONLY

BASE = ["data=builtin", "model.length=64", "loader.num_workers=0", "shards.num_proc=1",
        "trainer.max_steps=1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The files the mistakes point at, built once."""
    root = tmp_path_factory.mktemp("mistakes")
    from model import Diffusion, ModelConfig, save_pretrained

    hf = save_pretrained(Diffusion(ModelConfig(vocab_size=4097, mask_index=4096, length=64,
                                               hidden_size=32, cond_dim=16, n_blocks=1,
                                               n_heads=2)), root / "hf")
    truncated = save_pretrained(Diffusion(ModelConfig(
        vocab_size=4097, mask_index=4096, length=64, hidden_size=32, cond_dim=16, n_blocks=1,
        n_heads=2)), root / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    (root / "cut.ckpt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "empty_dir").mkdir()
    (root / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b",}\n')
    (root / "empty.txt").write_text("")
    (root / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    return {"hf": hf, "root": root}


# (command, overrides, what the one line must name); {root} and {hf} are filled in
MISTAKES = {
    "unknown mode": ("mdlm", ["mode=trian"], ["mode=trian"]),
    "misspelt key": ("mdlm", ["trainer.max_step=5"], ["trainer.max_step", "trainer.max_steps"]),
    "unknown group choice": ("mdlm", ["noise=bogus"], ["noise=bogus", "loglinear"]),
    "zero model length": ("mdlm", ["model.length=0"], ["model.length=0"]),
    "heads that do not divide": ("mdlm", ["model.n_heads=5"], ["model.n_heads=5"]),
    "unknown compile setting": ("mdlm", ["model.compile=sometimes"],
                                ["model.compile", "sometimes", "auto"]),
    "batch sizes that do not divide": ("mdlm", ["loader.global_batch_size=10",
                                                "loader.batch_size=4"],
                                       ["loader.global_batch_size=10", "loader.batch_size=4"]),
    "unknown precision": ("mdlm", ["trainer.precision=fp8"], ["trainer.precision=fp8"]),
    "missing DeepSpeed config": ("mdlm", ["trainer.deepspeed_config={root}/ds.json"],
                                 ["{root}/ds.json"]),
    "negative dead-rank timeout": ("mdlm", ["trainer.dead_rank_timeout_minutes=-1"],
                                   ["trainer.dead_rank_timeout_minutes=-1"]),
    "missing tokenizer": ("mdlm", ["data.tokenizer_name_or_path={root}/tok"], ["{root}/tok"]),
    "malformed JSONL": ("mdlm", ["data.train={root}/bad.jsonl"],
                        ["{root}/bad.jsonl", "line 2"]),
    "empty data file": ("mdlm", ["data.train={root}/empty.txt"], ["{root}/empty.txt"]),
    "no checkpoint path": ("mdlm", ["mode=ppl_eval"], ["eval.checkpoint_path"]),
    "missing checkpoint": ("mdlm", ["mode=ppl_eval", "eval.checkpoint_path={root}/run/nothing"],
                           ["{root}/run/nothing"]),
    "truncated checkpoint": ("mdlm", ["mode=ppl_eval", "eval.checkpoint_path={root}/truncated"],
                             ["{root}/truncated", "truncated"]),
    "checkpoint of another format": ("mdlm", ["mode=ppl_eval",
                                              "eval.checkpoint_path={root}/cut.ckpt"],
                                     ["{root}/cut.ckpt"]),
    "not a checkpoint": ("mdlm", ["mode=ppl_eval", "eval.checkpoint_path={root}/notes.txt"],
                         ["{root}/notes.txt"]),
    "directory that is no checkpoint": ("mdlm", ["mode=ppl_eval",
                                                 "eval.checkpoint_path={root}/empty_dir"],
                                        ["{root}/empty_dir"]),
    "zero Monte Carlo passes": ("mdlm", ["mode=ppl_eval", "eval.checkpoint_path={hf}",
                                         "eval.num_mc_samples=0"], ["eval.num_mc_samples=0"]),
    "zero eval batch": ("mdlm", ["mode=ppl_eval", "eval.checkpoint_path={hf}",
                                 "loader.eval_batch_size=0"], ["loader.eval_batch_size=0"]),
    "empty zero-shot list": ("mdlm", ["mode=ppl_eval", "eval.checkpoint_path={hf}",
                                      "eval.zero_shot=True", "eval.zero_shot_datasets=[]"],
                             ["eval.zero_shot_datasets"]),
    "unknown predictor": ("mdlm", ["mode=sample_eval", "eval.checkpoint_path={hf}",
                                   "sampling.predictor=bogus"], ["sampling.predictor=bogus"]),
    "zero steps": ("mdlm", ["mode=sample_eval", "eval.checkpoint_path={hf}", "sampling.steps=0"],
                   ["sampling.steps=0"]),
    "nucleus above one": ("mdlm", ["mode=sample_eval", "eval.checkpoint_path={hf}",
                                   "sampling.top_p=1.5"], ["sampling.top_p=1.5"]),
    "zero judge batch": ("mdlm", ["mode=sample_eval", "eval.checkpoint_path={hf}",
                                  "eval.compute_generative_perplexity=True",
                                  "eval.perplexity_batch_size=0"],
                         ["eval.perplexity_batch_size=0"]),
    "missing judge": ("mdlm", ["mode=sample_eval", "eval.checkpoint_path={hf}",
                               "eval.compute_generative_perplexity=True",
                               "eval.gen_ppl_eval_model_name_or_path={root}/judge"],
                      ["{root}/judge"]),
    "prepare: missing data file": ("prepare", ["data.train={root}/nowhere.txt"],
                                   ["{root}/nowhere.txt"]),
    "prepare: not UTF-8": ("prepare", ["data.train={root}/latin.txt"],
                           ["{root}/latin.txt", "byte 3"]),
    "prepare: misspelt key": ("prepare", ["data.trian={root}/bad.jsonl"], ["data.trian"]),
    "prepare: missing tokenizer": ("prepare", ["data.tokenizer_name_or_path={root}/tok"],
                                   ["{root}/tok"]),
}
QUICK = ("unknown mode", "zero steps", "truncated checkpoint", "prepare: not UTF-8")


@pytest.mark.parametrize("mistake", [m if m in QUICK else pytest.param(m, marks=pytest.mark.slow)
                                     for m in MISTAKES])
def test_a_mistake_is_one_line_and_exit_status_2(tmp_path, files, mistake):
    command, overrides, named = MISTAKES[mistake]
    fill = {"root": str(files["root"]), "hf": str(files["hf"])}
    module = "pretrain" if command == "mdlm" else "pretrain.data.prepare"
    env = dict(os.environ, **CPU_ONLY, MDLM_DATA_DIR=str(tmp_path / "data"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", module, *BASE, *(o.format(**fill) for o in overrides),
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"{command}: ")
             and not line.startswith(f"{command}: note:")]
    assert len(lines) == 1, done.stderr[-3000:]
    for text in named:
        assert text.format(**fill) in lines[0], lines[0]


def test_there_are_at_least_fifteen():
    assert len(MISTAKES) >= 15 and {m[0] for m in MISTAKES.values()} == {"mdlm", "prepare"}
