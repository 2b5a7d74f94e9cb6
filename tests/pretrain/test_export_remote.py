"""Exported checkpoints open with transformers alone (``trust_remote_code=True``).

A subprocess whose ``sys.path`` holds the standard library and site-packages but neither
this repository nor the editable install's finder loads each family's export through
``AutoModelForMaskedLM`` and must reproduce ``load_pretrained``'s backbone logits.
"""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import Diffusion, load_pretrained, save_pretrained
from model.checkpoint.hf import REMOTE_FILES
from pretrain import export
from tests.conftest import randomize_, tiny_config

REPO = Path(__file__).resolve().parents[2]

FAMILIES = {
    "mdlm": {},
    "mdlm_time": dict(time_conditioning=True),
    "sedd": dict(parameterization="sedd", time_conditioning=True),
    "d3pm": dict(parameterization="d3pm", T=1000, time_conditioning=True),
    "ar": dict(backbone="ar", parameterization="ar"),
}

# Run with ``python -I -S``: no PYTHONPATH, no user site, no .pth files (the editable
# install's finder is one), the working directory outside the repository.
CHILD = r"""
import sys
sys.path.extend(sys.argv[1].split("\n"))
import importlib
import os
assert os.getcwd() not in sys.path and "" not in sys.path
for name in ("model", "pretrain", "sampling", "evaluation"):
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    raise SystemExit(f"the project's package {name!r} is importable in the clean interpreter")

import json
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

work = sys.argv[2]
inputs = torch.load(f"{work}/inputs.pt")
out, modules = {}, {}
for name, (directory, x, sigma) in inputs.items():
    model = AutoModelForMaskedLM.from_pretrained(directory, trust_remote_code=True)
    assert not model.training
    modules[name] = sys.modules[type(model).__module__].__file__
    with torch.no_grad():
        out[name] = model(x, timesteps=sigma)
        assert isinstance(out[name], torch.Tensor)  # bare logits, as the release's code
        out[name + "/return_dict"] = model(x, timesteps=sigma, return_dict=True).logits
        if name == "ar":
            causal = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
            out[name + "/causal"] = causal(x)
torch.save(out, f"{work}/logits.pt")
print(json.dumps(modules))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each family built with random weights, saved, then exported by ``pretrain.export``;
    with fixed inputs and the in-project backbone's logits on them."""
    root = tmp_path_factory.mktemp("exports")
    g = torch.Generator().manual_seed(7)
    made = {}
    for seed, (name, changes) in enumerate(FAMILIES.items()):
        model = randomize_(Diffusion(tiny_config(**changes)), seed=seed).eval()
        save_pretrained(model, root / "src" / name)
        out = root / "out" / name
        assert export.main([str(root / "src" / name), str(out)]) == 0
        x = torch.randint(0, 22, (3, 12), generator=g)
        sigma = torch.rand(3, generator=g) * 3 + 0.1
        with torch.no_grad():
            expected = load_pretrained(out).backbone(x, sigma)
            torch.testing.assert_close(expected, model.backbone(x, sigma), rtol=0, atol=0)
        made[name] = (out, x, sigma, expected)
    return made


def test_export_writes_the_remote_code_and_auto_map(exports):
    for name, (out, *_) in exports.items():
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "mdlm"
        assert config["auto_map"]["AutoConfig"] == "configuration_mdlm.MDLMConfig"
        assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_mdlm.MDLM"
        assert ("AutoModelForCausalLM" in config["auto_map"]) == (name == "ar")
        for file in REMOTE_FILES:
            text = (out / file).read_text()
            assert text == (REPO / "model/checkpoint/remote" / file).read_text()
            for package in ("model", "pretrain", "sampling", "evaluation"):
                assert f"from {package}" not in text and f"import {package}" not in text


def test_time_conditioning_is_in_the_logits(exports):
    """The sigma-dependence the subprocess must reproduce is really there."""
    for name in ("mdlm_time", "sedd", "d3pm"):
        out, x, sigma, expected = exports[name]
        with torch.no_grad():
            other = load_pretrained(out).backbone(x, sigma + 1.0)
        assert (other - expected).abs().max() > 1e-3


@pytest.mark.slow
def test_transformers_alone_reproduces_the_logits(exports, tmp_path):
    torch.save({name: (str(out), x, sigma) for name, (out, x, sigma, _) in exports.items()},
               tmp_path / "inputs.pt")
    # site-packages (torch, transformers) added as plain directories: its .pth files, among
    # them the editable install's finder of this project, are not run
    paths = site.getsitepackages()
    assert all(Path(p).resolve() != REPO.resolve() for p in paths)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    child = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, "\n".join(paths), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert child.returncode == 0, child.stderr[-3000:]
    modules = json.loads(child.stdout.strip().splitlines()[-1])
    for file in modules.values():  # the copies transformers made, not this repository
        assert Path(file).resolve().is_relative_to((tmp_path / "hf").resolve()), file
    logits = torch.load(tmp_path / "logits.pt")
    for name, (_, _, _, expected) in exports.items():
        torch.testing.assert_close(logits[name], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[name + "/return_dict"], expected, rtol=1e-5,
                                   atol=1e-5)
    torch.testing.assert_close(logits["ar/causal"], exports["ar"][3], rtol=1e-5, atol=1e-5)


def test_push_to_hub_creates_the_repo_and_uploads_the_directory(exports, tmp_path,
                                                                monkeypatch):
    """The upload itself needs the network; here the hub client is a stand-in that records
    what export asks of it."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            calls.append(("files", files))
            return "https://huggingface.co/me/tiny/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    src = exports["mdlm"][0]
    assert export.main([str(src), str(tmp_path / "up"), "--push-to-hub", "me/tiny",
                        "--private"]) == 0
    assert calls[0][:2] == ("create_repo", "me/tiny")
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][:2] == ("upload_folder", "me/tiny")
    assert Path(calls[1][2]["folder_path"]) == tmp_path / "up"
    assert calls[2][1] == sorted(["config.json", "model.safetensors", *REMOTE_FILES])

    class OfflineApi(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    assert export.main([str(src), str(tmp_path / "up2"), "--push-to-hub", "me/tiny"]) == 2
