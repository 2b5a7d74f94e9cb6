"""Precision modes: the config checks (fast) and, on 2 CPU ranks, what DeepSpeed's bf16
engine communicates and that a run in it trains and resumes (slow).

Run as a script under the ``deepspeed`` launcher, this file is the worker of the
communication test: it builds an engine per mode exactly as ``pretrain.train`` does and
writes the bytes DeepSpeed's comms logger counted per optimizer step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pretrain import ds_config
from pretrain.ds_config import RunConfigError

MODES = ("bf16", "bf16-deepspeed")


def run_cfg(precision, autocast="auto", stage=2):
    return OmegaConf.create({
        "loader": {"batch_size": 4, "global_batch_size": 8},
        "trainer": {"precision": precision, "gradient_clip_val": 1.0,
                    "deepspeed_config": f"zero{stage}"},
        "model": {"autocast": autocast},
        "optim": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                  "impl": "auto"}})


def test_fp16_is_refused_on_cpu_and_configured_on_cuda():
    with pytest.raises(RunConfigError, match="trainer.precision=16-mixed needs a CUDA GPU"):
        ds_config.build(run_cfg("16-mixed"), 1, device_type="cpu")
    ds = ds_config.build(run_cfg("fp16"), 1, device_type="cuda")
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0  # dynamic
    assert ds["bf16"]["enabled"] is False
    assert ds_config.model_autocast("fp16") == "fp16"


def test_autocast_must_match_low_precision_weights():
    with pytest.raises(RunConfigError, match="model.autocast=fp16 needs the loss scaling"):
        ds_config.build(run_cfg("bf16", autocast="fp16"), 1, device_type="cuda")
    with pytest.raises(RunConfigError, match="model.autocast=fp16 needs the loss scaling"):
        ds_config.build(run_cfg("32", autocast="fp16"), 1, device_type="cpu")
    with pytest.raises(RunConfigError, match="model.autocast=off cannot run the bf16"):
        ds_config.build(run_cfg("bf16-deepspeed", autocast="off"), 1, device_type="cpu")
    with pytest.raises(RunConfigError, match="model.autocast=bf16 cannot run the fp16"):
        ds_config.build(run_cfg("fp16", autocast="bf16"), 1, device_type="cuda")
    assert ds_config.build(run_cfg("bf16", autocast="off"), 1, device_type="cpu")


def test_bf16_deepspeed_mode_enables_the_bf16_engine():
    for stage in (0, 1, 2, 3):
        ds = ds_config.build(run_cfg("bf16-deepspeed", stage=stage), 1, device_type="cpu")
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
        release = ds_config.build(run_cfg("bf16", stage=stage), 1, device_type="cpu")
        assert release["bf16"]["enabled"] is False and release["fp16"]["enabled"] is False
    assert ds_config.model_autocast("bf16-deepspeed") == ds_config.model_autocast("bf16")


def bytes_per_step(precision: str, steps: int = 3) -> int:
    """Bytes DeepSpeed's collectives moved per optimizer step after the first, on this rank,
    for a tiny DiT trained as ``pretrain.train`` builds it (ZeRO-2)."""
    import deepspeed
    import torch
    from deepspeed.comm import comm

    from model import Diffusion, ModelConfig
    from pretrain import optim
    from pretrain.train import LossModule

    cfg = run_cfg(precision)
    ds = ds_config.build(cfg, 2)
    ds["comms_logger"] = {"enabled": True, "prof_all": True}
    torch.manual_seed(0)
    model = Diffusion(ModelConfig(vocab_size=512, mask_index=511, length=32, hidden_size=64,
                                  n_heads=4, cond_dim=32, n_blocks=2,
                                  autocast=ds_config.model_autocast(precision)))
    module = LossModule(model)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optim.build(module, cfg, ds),
                                      config=ds)
    tokens = torch.randint(0, 511, (4, 32), generator=torch.Generator().manual_seed(1))
    totals = []
    for _ in range(steps):
        loss = engine(tokens, torch.ones_like(tokens)).loss
        engine.backward(loss)
        engine.step()
        totals.append(sum(size * record[0] for op in comm.comms_logger.comms_dict.values()
                          for size, record in op.items()))
    comm.comms_logger.comms_dict.clear()
    return (totals[-1] - totals[0]) // (steps - 1)


def worker(out: str) -> None:
    from pretrain import distributed as D

    D.init()
    counts = {mode: bytes_per_step(mode) for mode in MODES}
    if D.rank() == 0:
        Path(out).write_text(json.dumps(counts))


@pytest.mark.slow
def test_bf16_deepspeed_halves_the_bytes_communicated(tmp_path):
    out = tmp_path / "bytes.json"
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    from tests.pretrain.test_train import free_port

    done = subprocess.run([deepspeed, "--num_gpus", "2", "--no_local_rank", "--master_port",
                           str(free_port()), __file__, str(out)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(
                              Path(__file__).resolve().parents[2])))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = json.loads(out.read_text())
    assert counts["bf16"] > 100_000  # the gradients and weights of the tiny model
    assert counts["bf16-deepspeed"] / counts["bf16"] == pytest.approx(0.5, abs=0.02), counts


if __name__ == "__main__":
    worker(sys.argv[1])
