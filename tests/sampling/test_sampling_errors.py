"""Every ``sampling.*`` value out of range, and every combination a model rules out, is one
sentence naming the value; ``mdlm mode=sample_eval`` prints it as one line and exits 2
before it reads the checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from model import Diffusion
from model.errors import UserError
from sampling import Knobs, SamplingError, check_model, sample, semi_ar_sample
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]

BAD = [
    (dict(steps=0), "sampling.steps=0"),
    (dict(steps=-3), "sampling.steps=-3"),
    (dict(steps="many"), "sampling.steps='many'"),
    (dict(steps=2.5), "sampling.steps=2.5"),
    (dict(predictor="bogus"), "sampling.predictor=bogus"),
    (dict(predictor="ddpm-cache"), "sampling.predictor=ddpm-cache"),
    (dict(top_p=0), "sampling.top_p=0"),
    (dict(top_p=1.5), "sampling.top_p=1.5"),
    (dict(top_p=float("nan")), "sampling.top_p=nan"),
    (dict(temperature=0), "sampling.temperature=0"),
    (dict(temperature=-1.0), "sampling.temperature=-1.0"),
    (dict(gumbel_dtype="float16"), "sampling.gumbel_dtype=float16"),
    (dict(unmask_schedule="exponential"), "sampling.unmask_schedule=exponential"),
    (dict(order_temperature=-0.1), "sampling.order_temperature=-0.1"),
    (dict(confidence_threshold=1.5), "sampling.confidence_threshold=1.5"),
    (dict(confidence_threshold=0), "sampling.confidence_threshold=0"),
    (dict(predictor="remdm-cap", eta=1.5), "sampling.eta=1.5"),
    (dict(predictor="remdm-rescale", eta=-0.1), "sampling.eta=-0.1"),
    (dict(predictor="remdm-loop", eta=0.2), "sampling.eta=0.2"),  # above (1 - 0.9) / 0.9
    (dict(t_on=1.0), "sampling.t_on=1.0"),
    (dict(t_on=0.1, t_off=0.2), "sampling.t_off=0.2"),
    (dict(alpha_on=0), "sampling.alpha_on=0"),
    (dict(eps=0), "sampling.eps=0"),
    (dict(stride_length=0), "sampling.stride_length=0"),
    (dict(num_strides=-1), "sampling.num_strides=-1"),
    (dict(num_sample_batches=-2), "sampling.num_sample_batches=-2"),
]


@pytest.mark.parametrize("values,named", BAD, ids=[n for _, n in BAD])
def test_each_bad_value_is_one_sentence_naming_it(values, named):
    with pytest.raises(SamplingError) as info:
        Knobs(**values)
    message = str(info.value)
    assert isinstance(info.value, UserError) and named in message
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0


def test_defaults_and_a_config_section_build():
    knobs = Knobs.from_config(OmegaConf.load(ROOT / "pretrain/config/config.yaml").sampling)
    assert knobs == Knobs()  # the config's defaults are the dataclass's
    assert Knobs.from_config({"predictor": "remdm-loop", "steps": 1024, "top_p": 0.9,
                              "eta": None, "unknown_key": 1}).remdm_eta == 0.02
    with pytest.raises(SamplingError, match="sampling.top_p=0"):
        Knobs.from_config({"top_p": 0})
    with pytest.raises(SamplingError, match="sampling.steps=0"):
        Knobs().replace(steps=0)


IMPOSSIBLE = [
    ("first_hitting", dict(parameterization="subs", time_conditioning=True),
     "first_hitting needs a model without time conditioning"),
    ("ddpm_fast", dict(parameterization="sedd", time_conditioning=True),
     "ddpm_fast samples SUBS models"),
    ("remdm-loop", dict(parameterization="d3pm", time_conditioning=False),
     "remdm-loop samples SUBS models"),
    ("confidence", dict(parameterization="sedd", time_conditioning=True),
     "confidence samples SUBS models"),
    ("ddpm_cache", dict(parameterization="subs", time_conditioning=False, noise="cosine"),
     "ddpm_cache needs noise=loglinear"),
]


@pytest.mark.parametrize("predictor,model,named", IMPOSSIBLE, ids=[p for p, _, _ in IMPOSSIBLE])
def test_impossible_combinations(predictor, model, named):
    settings = dict(noise="loglinear") | model
    with pytest.raises(SamplingError, match=named):
        check_model(Knobs(predictor=predictor), settings["parameterization"],
                    settings["time_conditioning"], settings["noise"])


def test_the_sampler_refuses_them_too():
    model = Diffusion(tiny_config(time_conditioning=True)).eval()
    with pytest.raises(SamplingError, match="first_hitting needs a model without time"):
        sample(model, 1, 12, predictor="first_hitting")
    with pytest.raises(SamplingError, match="sampling.steps=0"):
        sample(model, 1, 12, steps=0)
    with pytest.raises(SamplingError, match="sampling.stride_length=12"):
        semi_ar_sample(model, 1, 12, stride_length=12, num_strides=1)
    with pytest.raises(SamplingError, match="sampling.stride_length=12 must lie in"):
        check_model(Knobs(semi_ar=True, stride_length=12), "subs", False, "loglinear", 12)


def sample_eval(tmp_path, *overrides):
    """mdlm mode=sample_eval pointed at a file that is not a checkpoint: the sampling values
    must be refused before it is read (reading it would fail with another message)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "not-a-checkpoint.ckpt").write_text("not a checkpoint\n")
    env = dict(os.environ, MDLM_DATA_DIR=str(tmp_path / "data"))
    return subprocess.run([sys.executable, "-m", "pretrain", "mode=sample_eval",
                           "data=builtin", "model.length=64",
                           f"eval.checkpoint_path={tmp_path / 'not-a-checkpoint.ckpt'}",
                           *overrides, f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,named", [
    ("sampling.predictor=bogus", "sampling.predictor=bogus is not a sampler"),
    ("sampling.steps=0", "sampling.steps=0 must be at least 1"),
])
def test_sample_eval_prints_one_line_and_exits_2(tmp_path, override, named):
    done = sample_eval(tmp_path, override)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr + done.stdout
    assert named in done.stderr and "not-a-checkpoint" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sample_eval_refuses_an_impossible_combination_and_a_bad_top_p(tmp_path):
    done = sample_eval(tmp_path / "a", "sampling.predictor=first_hitting",
                       "time_conditioning=True")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "first_hitting needs a model without time conditioning" in done.stderr
    done = sample_eval(tmp_path / "b", "sampling.top_p=1.2")
    assert done.returncode == 2 and "sampling.top_p=1.2 must lie in (0, 1]" in done.stderr

