"""The README's first command, shortened to a few steps: set-up, prepare, 2-rank DeepSpeed
training, perplexity and samples, in one run of ``launch/quickstart.sh``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CPU_ONLY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_from_set_up_to_samples(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, **CPU_ONLY, STEPS="8", SAMPLE_STEPS="100", RUN_DIR=str(run),
               MDLM_DATA_DIR=str(tmp_path / "data"), VENV=str(Path(sys.executable).parents[1]))
    done = subprocess.run(["bash", "launch/quickstart.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    ppl = json.loads(lines[lines.index("== perplexity of the EMA weights on the validation "
                                       "split") + 1])
    assert 1 < ppl["ppl"] < 4097 and ppl["tokens"] > 0
    summary = json.loads([line for line in lines if line.startswith('{"samples"')][-1])
    assert summary["samples"] == 4 and summary["predictor"] == "ddpm_fast"
    assert f"TensorBoard logs: {run}/tensorboard" in done.stdout
    assert (run / "checkpoints" / "latest").read_text().strip()
    assert any((run / "tensorboard").iterdir())
    assert len((run / "sample_eval" / "samples.jsonl").read_text().splitlines()) == 4
    assert len((run / "samples" / "step_00000008.jsonl").read_text().splitlines()) == 8
