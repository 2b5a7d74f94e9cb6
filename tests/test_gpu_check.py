"""benchmarks/gpu_check.sh cannot fail at its first line on a GPU machine: its dry run goes
through every step on the CPU from a copy of the checkout, importing the project from that
copy with PYTHONPATH unset (as on the GPU machine, where nothing is pip-installed)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PARTS = ("benchmarks", "ds_configs", "evaluation", "launch", "model", "pretrain", "sampling")


def test_gpu_check_dry_run_passes_every_step(tmp_path):
    checkout = tmp_path / "checkout"
    for part in PARTS:
        shutil.copytree(ROOT / part, checkout / part,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PY=sys.executable, OUT=str(tmp_path), MDLM_TEST_GPU="0")
    done = subprocess.run(["bash", str(checkout / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "all checks passed" in output
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    checks = {r["check"]: r["ok"] for r in records if "check" in r}
    assert checks == {"bf16_vs_fp32_logits": True, "fused_cross_entropy": True,
                      "bd3lm_flex_vs_sdpa": True,
                      "text8_crop_device_generator": True,
                      "validation_sampling_memory": True, "host_syncs_per_micro_step": True,
                      "resume_same_losses": True, "fp16": True}
    benches = {r["bench"] for r in records if "bench" in r}
    assert benches == {"train_step", "train_loss", "bd3lm_sampling"}
