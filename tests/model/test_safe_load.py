"""Loading a checkpoint never runs code from the file: crafted release ``.ckpt`` files and
tampered checkpoints of our own, read through ``model.checkpoint.safe``."""

import io
import json
import logging
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model import CheckpointError, Diffusion, load_pretrained
from model.checkpoint import safe
from model.checkpoint.pickled_tokenizer import special_ids
from model.errors import UntrustedCheckpointError
from tests.conftest import randomize_, tiny_config
from tests.model.test_checkpoint import release_config, word_tokenizer, write_release_ckpt

PAYLOAD = f"{__name__}.touch"


def touch(path):
    """The side effect a crafted file asks for: it must never happen on a safe load."""
    Path(path).write_text("ran")


class Payload:
    """Unpickling this object calls ``touch(marker)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return touch, (self.marker,)


def add_payload(path, marker, where="top") -> None:
    """Rewrites the checkpoint at ``path`` with a payload: beside the model (``top``) or in
    place of part of it (``weights``, ``ema``, ``config``)."""
    ckpt = torch.load(path, weights_only=False)  # our own file, just written
    if where == "top":
        ckpt["callbacks"] = {"Payload": Payload(marker)}
        ckpt["hyper_parameters"]["extra"] = Payload(marker)
    elif where == "weights":
        ckpt["state_dict"]["backbone.payload"] = Payload(marker)
    elif where == "ema":
        ckpt["ema"]["shadow_params"][0] = Payload(marker)
    elif where == "config":
        ckpt["hyper_parameters"]["config"] = Payload(marker)
    else:
        ckpt["payload"] = Payload(marker)
    torch.save(ckpt, path)


def crafted_release_ckpt(path, marker, where="top"):
    """A release-layout .ckpt (raw weights, EMA, config, tokenizer) plus a payload; returns
    (raw model, EMA model)."""
    raw = randomize_(Diffusion(tiny_config()), seed=1).eval()
    ema = randomize_(Diffusion(tiny_config()), seed=2).eval()
    shadow = [p.detach().clone() for p in ema.backbone.parameters()]
    write_release_ckpt(path, raw.backbone, release_config(), shadow,
                       word_tokenizer(with_mask=False))
    add_payload(path, marker, where)
    return raw, ema


@pytest.fixture
def x(rng):
    x = torch.randint(0, 22, (2, 12), generator=rng)
    x[:, ::2] = 22
    return x


def test_crafted_release_ckpt_loads_its_weights_and_runs_nothing(tmp_path, x, caplog):
    marker = tmp_path / "marker"
    raw, ema = crafted_release_ckpt(tmp_path / "a.ckpt", marker)
    with caplog.at_level(logging.WARNING):
        loaded = load_pretrained(tmp_path / "a.ckpt")
    assert not marker.exists()
    sigma = torch.tensor([0.4, 2.0])
    assert torch.equal(loaded.backbone(x, sigma), ema.backbone(x, sigma))
    assert loaded.mask_index == 22 and loaded.config.bos_index == 20
    reports = [r.getMessage() for r in caplog.records if r.name == safe.__name__]
    assert len(reports) == 1 and "\n" not in reports[0]  # one line names what was left out
    assert PAYLOAD in reports[0] and "tokenizers.Tokenizer" in reports[0]
    assert "eval.trust_checkpoint=True" in reports[0]
    assert torch.equal(load_pretrained(tmp_path / "a.ckpt", use_ema=False).backbone(x, sigma),
                       raw.backbone(x, sigma))
    assert not marker.exists()


@pytest.mark.parametrize("where", ["weights", "ema", "config"])
def test_a_payload_where_the_model_is_read_stops_the_load(tmp_path, where):
    marker = tmp_path / "marker"
    crafted_release_ckpt(tmp_path / "a.ckpt", marker, where)
    with pytest.raises(UntrustedCheckpointError, match="eval.trust_checkpoint=True") as err:
        load_pretrained(tmp_path / "a.ckpt")
    assert err.value.global_name == PAYLOAD and PAYLOAD in str(err.value)
    assert not marker.exists()


def test_trust_loads_the_whole_file(tmp_path, x):
    marker = tmp_path / "marker"
    _, ema = crafted_release_ckpt(tmp_path / "a.ckpt", marker)
    loaded = load_pretrained(tmp_path / "a.ckpt", trust=True)
    assert marker.read_text() == "ran"  # the user asked for a full load
    assert torch.equal(loaded.backbone(x, None), ema.backbone(x, None))


def our_checkpoint(tag_dir: Path, model: Diffusion) -> None:
    """A run checkpoint as pretrain.checkpointing writes it (one rank, ZeRO-2): run.json, a
    rank file with the RNG states and the EMA, DeepSpeed's model states."""
    tag_dir.mkdir(parents=True)
    names = [f"model.backbone.{n}" for n, _ in model.backbone.named_parameters()]
    params = [p.detach().clone() for p in model.backbone.parameters()]
    (tag_dir / "run.json").write_text(json.dumps({
        "model_config": model.config.to_dict(), "world_size": 1, "zero_stage": 2}))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    ema = {"decay": 0.9, "num_updates": 2, "partitioned": False, "names": names,
           "shapes": [tuple(p.shape) for p in params], "shadow": params}
    torch.save({"rng": rng, "ema": ema}, tag_dir / "rank_00000.pt")
    module = {f"model.backbone.{k}": v.clone() for k, v in model.backbone.state_dict().items()}
    torch.save({"module": module, "buffer_names": [], "global_steps": 2,
                "param_shapes": [{n: p.shape for n, p in zip(names, params)}]},
               tag_dir / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize("name", ["rank_00000.pt", "mp_rank_00_model_states.pt"])
def test_our_tampered_checkpoint_is_refused(tmp_path, x, name):
    model = randomize_(Diffusion(tiny_config()), seed=3).eval()
    our_checkpoint(tmp_path / "step_0000002", model)
    use_ema = name.startswith("rank")
    loaded = load_pretrained(tmp_path / "step_0000002", use_ema=use_ema)
    assert torch.equal(loaded.backbone(x, None), model.backbone(x, None))
    marker = tmp_path / "marker"
    add_payload(tmp_path / "step_0000002" / name, marker, "beside")
    with pytest.raises(UntrustedCheckpointError, match=f"{name} names {PAYLOAD}.*trust=True"):
        load_pretrained(tmp_path / "step_0000002", use_ema=use_ema)
    assert not marker.exists()


def test_attributes_of_allowed_globals_cannot_be_set(tmp_path):
    # GLOBAL omegaconf.base Metadata; BUILD (None, {"pwned": 1}) would set a class attribute
    data = b"\x80\x02comegaconf.base\nMetadata\nN}X\x05\x00\x00\x00pwnedK\x01s\x86b."
    module = safe.pickle_module(safe.RELEASE, "crafted", safe.LIBRARY_FLAG, True, [])
    with pytest.raises(UntrustedCheckpointError, match="attributes of Metadata"):
        module.Unpickler(io.BytesIO(data)).load()
    from omegaconf.base import Metadata

    assert not hasattr(Metadata, "pwned")


def test_strict_and_lenient_unpicklers(tmp_path):
    data = pickle.dumps({"keep": [1, 2.0, "three"], "payload": Payload(tmp_path / "m")},
                        protocol=2)
    refused = []
    lenient = safe.pickle_module(safe.OURS, "f", safe.LIBRARY_FLAG, True, refused)
    out = lenient.Unpickler(io.BytesIO(data)).load()
    assert out["keep"] == [1, 2.0, "three"] and isinstance(out["payload"], safe.Refused)
    assert out["payload"].args == (str(tmp_path / "m"),) and refused == [PAYLOAD]
    strict = safe.pickle_module(safe.OURS, "f", "checkpointing.trust=True", False, [])
    with pytest.raises(CheckpointError, match=f"f names {PAYLOAD}.*checkpointing.trust=True"):
        strict.Unpickler(io.BytesIO(data)).load()
    assert not (tmp_path / "m").exists()


def test_restricted_torch_load_is_scoped(tmp_path):
    torch.save({"payload": Payload(tmp_path / "m")}, tmp_path / "f.pt")
    original = torch.load
    with pytest.raises(UntrustedCheckpointError, match="checkpointing.trust"):
        with safe.restricted_torch_load(safe.OURS, flag="checkpointing.trust=True"):
            torch.load(tmp_path / "f.pt", weights_only=False)
    assert torch.load is original and not (tmp_path / "m").exists()


class LegacyTokenizer:
    """The pickled state of a transformers 4 fast tokenizer (special tokens as attributes,
    AddedToken objects among them)."""

    def __init__(self):
        from tokenizers import AddedToken

        backend = word_tokenizer(with_mask=True)._tokenizer
        self.__dict__.update(_tokenizer=backend, _bos_token="[BOS]",
                             _eos_token=AddedToken("[EOS]", special=True),
                             _mask_token=AddedToken("[MASK]", special=True))


def test_special_ids_come_from_the_pickled_state(tmp_path):
    data = pickle.dumps({"new": word_tokenizer(with_mask=True), "old": LegacyTokenizer(),
                         "none": word_tokenizer(with_mask=False)}, protocol=2)
    module = safe.pickle_module(safe.RELEASE, "f", safe.LIBRARY_FLAG, True, [])
    loaded = module.Unpickler(io.BytesIO(data)).load()
    expected = {"mask_token": 22, "bos_token": 20, "eos_token": 21}
    assert special_ids(loaded["new"]) == expected == special_ids(loaded["old"])
    assert special_ids(loaded["none"]) == dict(expected, mask_token=None)
    assert special_ids(word_tokenizer(with_mask=True)) == expected  # a trusted, real one
