"""Real multi-process DeepSpeed runs on CPU (2 ranks, gloo): slow, marked as such."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CPU_ONLY

pytestmark = pytest.mark.slow

TINY = ["data=builtin", "model.length=64", "model.hidden_size=64", "model.n_blocks=2",
        "model.n_heads=4", "model.cond_dim=32", "loader.global_batch_size=16",
        "loader.batch_size=4", "loader.eval_batch_size=16", "loader.num_workers=0",
        "trainer.precision=32", "optim.lr=1e-3", "lr_scheduler.num_warmup_steps=0",
        "trainer.val_check_interval=0", "trainer.log_every_n_steps=1000", "shards.num_proc=1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run_dir, *overrides, ranks=2):
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--no_local_rank", "--master_port",
            str(free_port()), "--module", "pretrain", *TINY, *overrides,
            f"hydra.run.dir={run_dir}"]


def train(run_dir, data_dir, *overrides, ranks=2, check=True, timeout=400):
    env = dict(os.environ, **CPU_ONLY, MDLM_DATA_DIR=str(data_dir))
    done = subprocess.run(command(run_dir, *overrides, ranks=ranks), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(run_dir) -> dict:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def raw_weights(run_dir):
    from model import load_pretrained

    return load_pretrained(run_dir, use_ema=False).backbone.state_dict()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_goes_down_under_each_zero_stage(tmp_path, data_dir, stage):
    # validation samples (36 s here) under ZeRO-3 only, whose sampler gathers the weights
    train(tmp_path, data_dir, f"trainer.deepspeed_config=zero{stage}", "trainer.max_steps=40",
          "checkpointing.every_n_steps=1000", "trainer.val_check_interval=40",
          f"eval.generate_samples={stage == 3}")
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, 41))
    first = sum(curve[s] for s in range(1, 6)) / 5
    last = sum(curve[s] for s in range(36, 41)) / 5
    assert last < first - 0.5, (first, last)
    record = json.loads(Path(tmp_path, "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val/nll"] < first and record["val/ppl"] > 1
    assert Path(tmp_path, "checkpoints", "latest").read_text() == "step_0000040"
    assert any(Path(tmp_path, "tensorboard").iterdir())
    assert Path(tmp_path, "config.yaml").is_file()
    samples = list(Path(tmp_path, "samples").glob("*.jsonl"))
    assert [p.name for p in samples] == (["step_00000040.jsonl"] if stage == 3 else [])


RESUMED = ["trainer.deepspeed_config=zero2", "trainer.max_steps=12",
           "checkpointing.every_n_steps=4"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    """An uninterrupted 12-step run that the interrupted ones must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(run_dir, data_dir, *RESUMED)
    return run_dir


def test_a_run_whose_rank_1_is_killed_resumes_exactly(tmp_path, data_dir, straight):
    common = RESUMED
    killed = tmp_path / "killed"
    started = time.monotonic()
    done = train(killed, data_dir, *common, "trainer.fail_at_step=6", "trainer.fail_rank=1",
                 check=False)
    assert done.returncode != 0 and time.monotonic() - started < 120
    assert "rank 1 (" in done.stderr and "died" in done.stderr, done.stderr[-3000:]
    assert Path(killed, "checkpoints", "latest").read_text() == "step_0000004"
    assert max(losses(killed)) >= 6  # steps 5 and 6 were logged, then lost
    train(killed, data_dir, *common)
    assert losses(killed) == losses(straight)  # every loss after the resume point, exactly
    a, b = raw_weights(straight), raw_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, data_dir, straight):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)  # checkpoints at steps 8 and 12
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000012"
    shard = checkpoints / "step_0000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # a copy cut short by a full disk or a lost node
        f.truncate(size // 2)
    done = train(run_dir, data_dir, *RESUMED)
    log = done.stdout + done.stderr
    assert (f"step_0000012 is damaged (zero_pp_rank_1_mp_rank_00_optim_states.pt has "
            f"{size // 2} bytes, {size} when it was published)") in log, log[-3000:]
    assert f"resumed from {checkpoints / 'step_0000008'}" in log
    assert (checkpoints / "damaged_step_0000012").is_dir()
    assert (checkpoints / "latest").read_text() == "step_0000012"
    assert losses(run_dir) == losses(straight)  # steps 9 to 12 again, exactly
    a, b = raw_weights(straight), raw_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, data_dir):
    env = dict(os.environ, **CPU_ONLY, MDLM_DATA_DIR=str(data_dir))
    cmd = command(tmp_path, "trainer.max_steps=100000", "checkpointing.every_n_steps=100000")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and
                                          len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    import psutil

    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "deepspeed.launcher.launch" in " ".join(p.parent().cmdline())]
    assert len(ranks) == 2
    for child in ranks:  # as slurm signals every task of the job
        child.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    tag = Path(tmp_path, "checkpoints", "latest").read_text()
    saved_step = int(tag.split("_")[1])
    assert saved_step >= 3
    done = train(tmp_path, data_dir, f"trainer.max_steps={saved_step + 2}",
                 "checkpointing.every_n_steps=100000")
    assert f"resumed from {tmp_path / 'checkpoints' / tag}" in done.stdout + done.stderr
    assert max(losses(tmp_path)) == saved_step + 2


def val_nll(run_dir) -> dict:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val/nll"] for r in map(json.loads, lines) if "val/nll" in r}


def test_zero3_ema_export_equals_zero2(tmp_path, data_dir):
    from model import load_pretrained

    for stage in (2, 3):
        train(tmp_path / f"z{stage}", data_dir, f"trainer.deepspeed_config=zero{stage}",
              "trainer.max_steps=6", "checkpointing.every_n_steps=1000", "training.ema=0.9",
              "trainer.val_check_interval=3", "sampling.steps=16")
    # validation with the EMA swapped in is the same under ZeRO-3 as under ZeRO-2 ...
    z2, z3 = val_nll(tmp_path / "z2"), val_nll(tmp_path / "z3")
    assert sorted(z3) == [3, 6]
    for s in z2:
        assert z3[s] == pytest.approx(z2[s], rel=1e-5)
    # ... so are the samples drawn from it (ZeRO-3 samples from a gathered copy)
    drawn = {stage: [json.loads(line)["token_ids"] for line in Path(
        tmp_path, f"z{stage}", "samples", "step_00000006.jsonl").read_text().splitlines()]
        for stage in (2, 3)}
    assert len(drawn[2]) == 2 * 2 * 16  # ranks x sampling.num_sample_batches x eval batch
    assert drawn[3] == drawn[2]
    # ... and leaves training untouched
    train(tmp_path / "z3-noval", data_dir, "trainer.deepspeed_config=zero3",
          "trainer.max_steps=6", "checkpointing.every_n_steps=1000", "training.ema=0.9")
    assert losses(tmp_path / "z3-noval") == losses(tmp_path / "z3")
    out = subprocess.run([sys.executable, "-m", "pretrain.export", str(tmp_path / "z3"),
                          str(tmp_path / "export")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    exported = load_pretrained(tmp_path / "export").backbone.state_dict()
    z2 = load_pretrained(tmp_path / "z2").backbone.state_dict()
    raw = load_pretrained(tmp_path / "z2", use_ema=False).backbone.state_dict()
    for key in z2:
        torch.testing.assert_close(exported[key], z2[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(z2[k], raw[k]) for k in z2)  # the EMA is not the raw weights


def run_cli(tmp_path, data_dir, *overrides):
    env = dict(os.environ, **CPU_ONLY, MDLM_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-m", "pretrain", *TINY, *overrides,
                           f"hydra.run.dir={tmp_path}"], env=env, capture_output=True,
                          text=True, timeout=300)


def test_bad_configurations_fail_early_with_one_sentence(tmp_path, data_dir):
    done = run_cli(tmp_path / "a", data_dir, "loader.global_batch_size=10")
    assert done.returncode == 2 and "loader.global_batch_size=10 is not a multiple" in done.stderr
    done = run_cli(tmp_path / "b", data_dir, "trainer.devicess=2")
    assert done.returncode != 0 and "devicess" in done.stderr
    done = run_cli(tmp_path / "c", data_dir, "shards.build=False",
                   "data.cache_dir=" + str(tmp_path / "empty"))
    assert done.returncode == 2 and "not built and shards.build=False" in done.stderr
    done = run_cli(tmp_path / "e", data_dir, "parameterization=sedd", "time_conditioning=True",
                   "sampling.predictor=ddpm_fast", "trainer.val_check_interval=2")
    assert done.returncode == 2 and "ddpm_fast samples SUBS models" in done.stderr
    assert run_cli(tmp_path / "d", data_dir, "trainer.max_steps=2").returncode == 0
    done = run_cli(tmp_path / "d", data_dir, "trainer.max_steps=4", "model.hidden_size=32")
    assert done.returncode == 2 and "hidden_size: checkpoint 64 vs run 32" in done.stderr
    for result in (done,):
        assert "Traceback" not in result.stderr


def test_diverging_run_stops_after_k_skipped_steps(tmp_path, data_dir):
    done = run_cli(tmp_path, data_dir, "optim.lr=inf", "trainer.max_skipped_in_a_row=3",
                   "trainer.max_steps=50", "trainer.deepspeed_config=zero0",
                   "loader.batch_size=16")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "3 steps in a row had a NaN/inf loss or gradient" in done.stderr
    skipped = [json.loads(line)["skipped"] for line in
               Path(tmp_path, "metrics.jsonl").read_text().splitlines()]
    assert skipped[-3:] == [1, 2, 3]  # counted, and the third in a row stopped the run


BD3LM = ["parameterization=bd3lm", "block_size=16", "ignore_bos=True", "training.resample=True",
         "training.clip_search_widths=[0.5]", "training.clip_search_delta=0.25",
         "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
         "eval.generate_samples=False", "trainer.deepspeed_config=zero2",
         "trainer.max_steps=4", "checkpointing.every_n_steps=2"]


def test_a_killed_block_diffusion_run_resumes_exactly_with_its_searched_clip(tmp_path,
                                                                              data_dir):
    """2 ranks, ZeRO-2, BD3-LM with resampling and the clip search at step 2: killed at step
    3 and resumed from step 2, it logs the uninterrupted run's losses and ends with its
    weights, so the clip the search chose came back with the checkpoint."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(straight, data_dir, *BD3LM)
    done = train(killed, data_dir, *BD3LM, "trainer.fail_at_step=3", "trainer.fail_rank=1",
                 check=False)
    assert done.returncode != 0
    assert Path(killed, "checkpoints", "latest").read_text() == "step_0000002"
    train(killed, data_dir, *BD3LM)
    assert losses(killed) == losses(straight)
    clip = [json.loads(line) for line in Path(straight, "metrics.jsonl").read_text().splitlines()
            if "val/clip_min" in line][0]
    assert (clip["val/clip_min"], clip["val/clip_max"]) != (1e-3, 1.0)  # the search moved it
    a, b = raw_weights(straight), raw_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
