import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from model import CheckpointError, Diffusion, load_pretrained, save_pretrained
from tests.conftest import randomize_, tiny_config

V = 23  # tiny vocabulary: 22 tokens + [MASK] at 22


def word_tokenizer(with_mask: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(20)] + ["[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(words)}
    if with_mask:
        vocab["[MASK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"mask_token": "[MASK]"} if with_mask else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                   **extra)


def release_config(**top):
    """The part of the release's Hydra config a .ckpt carries in hyper_parameters."""
    cfg = {
        "mode": "train", "backbone": "dit", "parameterization": "subs",
        "time_conditioning": False, "T": 0, "subs_masking": False,
        "model": {"name": "tiny", "type": "ddit", "hidden_size": 32, "cond_dim": 16,
                  "length": 12, "n_blocks": 2, "n_heads": 2, "scale_by_sigma": True,
                  "dropout": 0.0},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "training": {"ema": 0.9999, "antithetic_sampling": True, "importance_sampling": False,
                     "sampling_eps": 1e-3, "change_of_variables": False},
    }
    cfg.update(top)
    return OmegaConf.create(cfg)


def write_release_ckpt(path, backbone, config, shadow, tokenizer):
    state = {"backbone." + k: v.clone() for k, v in backbone.state_dict().items()}
    ckpt = {
        "epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.2.1",
        "state_dict": state,
        "hyper_parameters": {"config": config, "tokenizer": tokenizer},
        "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow,
                "collected_params": None},
        "loops": {}, "optimizer_states": [], "lr_schedulers": [],
    }
    torch.save(ckpt, path)


@pytest.fixture
def x(rng):
    x = torch.randint(0, 22, (2, 12), generator=rng)
    x[:, ::2] = 22
    return x


def test_save_then_load_gives_identical_logits(tmp_path, x):
    for changes in (dict(), dict(parameterization="sedd", time_conditioning=True),
                    dict(backbone="ar", parameterization="ar"),
                    dict(parameterization="d3pm", T=100, subs_masking=True)):
        model = randomize_(Diffusion(tiny_config(**changes)))
        directory = save_pretrained(model, tmp_path / str(len(changes)))
        loaded = load_pretrained(directory)
        assert loaded.config == model.config
        sigma = torch.tensor([0.3, 1.2])
        assert torch.equal(loaded.backbone(x, sigma), model.eval().backbone(x, sigma))
        assert torch.equal(loaded(x, sigma), model(x, sigma))


def write_hf_dir(directory, tensors, filename="model.safetensors", **config):
    """The files of kuleshov-group/mdlm-owt, written by hand."""
    directory.mkdir(parents=True)
    cfg = {"architectures": ["MDLM"],
           "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                        "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
           "cond_dim": 16, "dropout": 0.1, "hidden_dim": 32, "model_length": 12,
           "model_type": "mdlm", "n_blocks": 2, "n_heads": 2, "return_dict": False,
           "time_conditioning": False, "torch_dtype": "float32",
           "transformers_version": "4.38.2", "vocab_size": V}
    cfg.update(config)
    (directory / "config.json").write_text(json.dumps(cfg))
    if filename.endswith(".safetensors"):
        save_file(tensors, str(directory / filename))
    else:
        torch.save(tensors, directory / filename)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hand_written_hf_layout_loads_its_weights(tmp_path, x, filename):
    source = randomize_(Diffusion(tiny_config())).eval()
    tensors = {"backbone." + k: v.clone().contiguous()
               for k, v in source.backbone.state_dict().items() if "inv_freq" not in k}
    write_hf_dir(tmp_path / "m", tensors, filename)
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.mask_index == V - 1 and loaded.config.parameterization == "subs"
    assert loaded.config.dropout == 0.1 and not loaded.training
    assert torch.equal(loaded.backbone(x, None), source.backbone(x, None))


def test_sharded_safetensors(tmp_path, x):
    source = randomize_(Diffusion(tiny_config())).eval()
    tensors = {"backbone." + k: v.clone() for k, v in source.backbone.state_dict().items()}
    names = sorted(tensors)
    write_hf_dir(tmp_path / "m", {k: tensors[k] for k in names[:5]},
                 "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[5:]},
              str(tmp_path / "m" / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors"
                            for i, k in enumerate(names)}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(load_pretrained(tmp_path / "m").backbone(x, None),
                       source.backbone(x, None))


def test_hub_id_is_read_from_the_hub_cache(tmp_path, x, monkeypatch):
    import huggingface_hub.constants as hub

    source = randomize_(Diffusion(tiny_config())).eval()
    tensors = {"backbone." + k: v.clone() for k, v in source.backbone.state_dict().items()}
    repo = tmp_path / "hub" / "models--kuleshov-group--mdlm-owt"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_hf_dir(repo / "snapshots" / commit, tensors)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    loaded = load_pretrained("kuleshov-group/mdlm-owt")
    assert torch.equal(loaded.backbone(x, None), source.backbone(x, None))
    with pytest.raises(CheckpointError, match="kuleshov-group/nothing"):
        load_pretrained("kuleshov-group/nothing")


@pytest.mark.parametrize("kind", ["mdlm", "sedd", "ar"])
def test_release_lightning_ckpt_uses_ema_weights(tmp_path, x, kind):
    changes = {"mdlm": {}, "sedd": dict(parameterization="sedd", time_conditioning=True),
               "ar": dict(backbone="ar", parameterization="ar")}[kind]
    raw = randomize_(Diffusion(tiny_config(**changes)), seed=1).eval()
    ema = randomize_(Diffusion(tiny_config(**changes)), seed=2).eval()
    shadow = [p.detach().clone() for p in ema.backbone.parameters()]
    config = release_config(**{k: v for k, v in changes.items() if k != "backbone"},
                            backbone="ar" if kind == "ar" else "dit")
    write_release_ckpt(tmp_path / "last.ckpt", raw.backbone, config, shadow,
                       word_tokenizer(with_mask=False))
    sigma = torch.tensor([0.4, 2.0])

    loaded = load_pretrained(tmp_path / "last.ckpt")
    assert loaded.config.parameterization == changes.get("parameterization", "subs")
    assert loaded.config.time_conditioning == changes.get("time_conditioning", False)
    assert loaded.mask_index == V - 1
    assert torch.equal(loaded.backbone(x, sigma), ema.backbone(x, sigma))
    assert torch.equal(loaded(x, sigma), ema(x, sigma))

    raw_loaded = load_pretrained(tmp_path / "last.ckpt", use_ema=False)
    assert torch.equal(raw_loaded.backbone(x, sigma), raw.backbone(x, sigma))


def test_ckpt_overrides_win_and_mask_comes_from_the_tokenizer(tmp_path):
    raw = randomize_(Diffusion(tiny_config(mask_index=22)))
    write_release_ckpt(tmp_path / "a.ckpt", raw.backbone, release_config(),
                       [p.detach() for p in raw.backbone.parameters()],
                       word_tokenizer(with_mask=True))
    loaded = load_pretrained(tmp_path / "a.ckpt", T=1000, dropout=0.0)
    assert loaded.mask_index == 22 and loaded.config.T == 1000
    assert loaded.config.bos_index == 20 and loaded.config.eos_index == 21


def test_mismatched_architecture_names_keys_and_shapes(tmp_path):
    model = randomize_(Diffusion(tiny_config()))
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"vocab_embed.embedding \(23, 32\) vs \(30, 32\)"):
        load_pretrained(tmp_path / "m", vocab_size=30)
    with pytest.raises(CheckpointError, match="missing keys: blocks.2"):
        load_pretrained(tmp_path / "m", n_blocks=3)
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.0.adaLN_modulation"):
        load_pretrained(tmp_path / "m", backbone="ar", parameterization="ar")


def test_bad_inputs_fail_with_one_clear_sentence(tmp_path):
    from model import ConfigError

    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nothing_here")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(tmp_path / "junk.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a .ckpt"):
        load_pretrained(tmp_path / "empty")
    write_hf_dir(tmp_path / "gpt", {}, model_type="gpt2")
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        load_pretrained(tmp_path / "gpt")
    (tmp_path / "gpt" / "model.safetensors").unlink()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "mdlm"}))
    with pytest.raises(CheckpointError, match="no weights"):
        load_pretrained(tmp_path / "gpt")
    with pytest.raises(ConfigError, match="time_conditioning"):
        load_pretrained(tmp_path / "gpt", time_conditionin=True)


def test_ema_of_another_network_is_refused(tmp_path):
    raw = randomize_(Diffusion(tiny_config()))
    shadow = [p.detach() for p in raw.backbone.parameters()][::-1]
    write_release_ckpt(tmp_path / "a.ckpt", raw.backbone, release_config(), shadow, None)
    with pytest.raises(CheckpointError, match="parameter order"):
        load_pretrained(tmp_path / "a.ckpt")
    write_release_ckpt(tmp_path / "b.ckpt", raw.backbone, release_config(), shadow[:3], None)
    with pytest.raises(CheckpointError, match="EMA holds 3 tensors"):
        load_pretrained(tmp_path / "b.ckpt")
