"""What a first GPU run depends on, checked on the CPU: the peak FLOPs behind MFU, no
per-forward host-to-device copy in the time embedding, the quickstart's rank count on
machines with 0, 1, 3, 8 or 16 GPUs, and the test suite itself staying on the CPU."""

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import CPU_ONLY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 SXM5 80GB", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA RTX A6000", 155e12),
    ("NVIDIA GeForce RTX 4090", None),
    ("Tesla V100-SXM2-32GB", None),
])
def test_peak_flops_tells_the_h100_form_factors_apart_and_skips_unknown_devices(name, peak):
    from pretrain.flops import peak_for_name

    assert peak_for_name(name) == peak


def test_peak_flops_is_none_on_a_cpu_run(monkeypatch):
    from pretrain.flops import peak_flops

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: pytest.fail("asked CUDA"))
    assert peak_flops() is None


def test_time_embedding_builds_its_frequencies_once_and_adds_no_state(monkeypatch):
    from model.layers import TimestepEmbedder

    embedder = TimestepEmbedder(32)
    assert set(embedder.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                          "mlp.2.bias"}
    assert list(embedder.buffers()) == []
    t = torch.rand(5, generator=torch.Generator().manual_seed(0))
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(TimestepEmbedder.timestep_embedding(t, 256), expected,
                               rtol=0, atol=0)
    embedder(t)  # the first forward may build them
    built = []
    real_arange = torch.arange
    monkeypatch.setattr(torch, "arange", lambda *a, **k: built.append(1) or real_arange(*a, **k))
    for _ in range(3):
        embedder(t)
    assert built == []


def test_a_bf16_cast_does_not_round_the_frequencies():
    from model.layers import TimestepEmbedder

    t = torch.tensor([0.5, 3.0])
    before = TimestepEmbedder.timestep_embedding(t, 256)
    TimestepEmbedder(32).to(torch.bfloat16)
    assert torch.equal(TimestepEmbedder.timestep_embedding(t, 256), before)


FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in *device_count*) echo "$FAKE_GPUS" ;; esac
"""
FAKE_DEEPSPEED = """#!/usr/bin/env bash
echo "DS_ACCELERATOR=${DS_ACCELERATOR:-} $*" > "$RUN_DIR/launch"
"""


def quickstart(tmp_path, gpus: int, **env):
    """Runs launch/quickstart.sh against a stand-in environment whose python reports
    ``gpus`` GPUs and whose deepspeed only records its command line."""
    venv = tmp_path / f"venv{gpus}"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("deepspeed", FAKE_DEEPSPEED),
                       ("mdlm", "#!/usr/bin/env bash\n")):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    run = tmp_path / f"run{gpus}"
    run.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "RANKS")}
    done = subprocess.run(["bash", "launch/quickstart.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env=dict(base, VENV=str(venv), RUN_DIR=str(run), FAKE_GPUS=str(gpus),
                                   MDLM_DATA_DIR=str(tmp_path / "data"), **env))
    launch = (run / "launch").read_text() if (run / "launch").is_file() else ""
    return done, launch


@pytest.mark.parametrize("gpus, ranks, accelerator", [(0, 2, "cpu"), (1, 1, ""), (3, 2, ""),
                                                      (8, 8, ""), (16, 8, "")])
def test_quickstart_runs_one_rank_per_gpu_and_two_on_the_cpu(tmp_path, gpus, ranks,
                                                             accelerator):
    done, launch = quickstart(tmp_path, gpus)
    assert done.returncode == 0, done.stderr[-2000:]
    assert launch.startswith(f"DS_ACCELERATOR={accelerator} --num_gpus {ranks} ")
    assert "loader.global_batch_size=16 " in launch
    assert f"loader.batch_size={16 // ranks} " in launch
    assert f"== training on {ranks} ranks" in done.stdout


@pytest.mark.parametrize("gpus, ranks", [(1, 2), (8, 3)])
def test_quickstart_refuses_ranks_the_machine_or_batch_cannot_take(tmp_path, gpus, ranks):
    done, launch = quickstart(tmp_path, gpus, RANKS=str(ranks))
    assert done.returncode == 2 and launch == ""
    assert f"RANKS={ranks}" in done.stderr


def test_the_test_suite_runs_on_the_cpu():
    if os.environ.get("MDLM_TEST_GPU") == "1":
        pytest.skip("MDLM_TEST_GPU=1 leaves the GPUs visible")
    assert {k: os.environ.get(k) for k in CPU_ONLY} == CPU_ONLY
    assert not torch.cuda.is_available()
