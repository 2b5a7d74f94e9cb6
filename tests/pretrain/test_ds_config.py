import json

import pytest
from omegaconf import OmegaConf

from pretrain import ds_config
from pretrain.ds_config import RunConfigError
from pretrain.schedules import lr_lambda


def run_cfg(**changes):
    cfg = {"loader": {"batch_size": 8, "global_batch_size": 64},
           "trainer": {"precision": "bf16", "gradient_clip_val": 1.0,
                       "deepspeed_config": "zero2"}}
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return OmegaConf.create(cfg)


@pytest.mark.parametrize("name", ds_config.NAMES)
def test_auto_fields_are_filled(name):
    ds = ds_config.build(run_cfg(trainer__deepspeed_config=name), world=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (64, 8, 2, 1.0)
    assert ds["fp16"]["enabled"] is False  # bf16: fp32 weights, autocast in the network
    assert "auto" not in json.dumps(ds)


def test_fp16_and_bad_values():
    ds = ds_config.build(run_cfg(trainer__precision="fp16"), 1, device_type="cuda")
    assert ds["fp16"]["enabled"] is True
    with pytest.raises(RunConfigError, match="trainer.precision=fp16 needs a CUDA GPU"):
        ds_config.build(run_cfg(trainer__precision="fp16"), 1, device_type="cpu")
    with pytest.raises(RunConfigError, match="global_batch_size=64 is not a multiple"):
        ds_config.build(run_cfg(loader__batch_size=24), 1)
    with pytest.raises(RunConfigError, match="trainer.precision=bf15"):
        ds_config.build(run_cfg(trainer__precision="bf15"), 1)
    with pytest.raises(RunConfigError, match="zero9"):
        ds_config.build(run_cfg(trainer__deepspeed_config="zero9"), 1)


def test_zero2_buckets_are_explicit():
    zero = ds_config.build(run_cfg(), 4)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 50_000_000


def test_zero3_compiles_after_initialize():
    for name, expected in (("zero2", False), ("zero3", True), ("zero3_offload", True)):
        ds = ds_config.build(run_cfg(trainer__deepspeed_config=name), 4)
        assert ds_config.compile_after_init(ds, True) is expected
        assert ds_config.compile_after_init(ds, False) is False


@pytest.mark.parametrize("precision, setting, device, expected", [
    ("32", "auto", "cuda", True), ("32-true", "auto", "cuda", True),
    ("bf16", "auto", "cuda", False), ("bf16-deepspeed", "auto", "cuda", False),
    ("bf16", True, "cuda", True), ("32", False, "cuda", False),
    ("32", "auto", "cpu", False), ("32", True, "cpu", False)])
def test_tf32(precision, setting, device, expected):
    cfg = run_cfg(trainer__precision=precision, trainer__tf32=setting)
    assert ds_config.tf32_enabled(cfg, device) is expected


def test_tf32_on_cpu_changes_nothing():
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    assert ds_config.apply_tf32(run_cfg(trainer__precision="32"), "cpu") is False
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(RunConfigError, match="trainer.tf32=maybe"):
        ds_config.tf32_enabled(run_cfg(trainer__tf32="maybe"), "cuda")


def test_unfilled_auto_is_refused(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_batch_size": "auto",
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(RunConfigError, match="zero_optimization.reduce_bucket_size"):
        ds_config.build(run_cfg(trainer__deepspeed_config=str(path)), 1)


def test_lr_schedules():
    cfg = OmegaConf.create({"optim": {"lr": 1e-3},
                            "lr_scheduler": {"name": "constant_warmup", "num_warmup_steps": 10}})
    f = lr_lambda(cfg, 100)
    assert [f(0), f(5), f(10), f(50)] == [0.0, 0.5, 1.0, 1.0]
    cfg.lr_scheduler = {"name": "cosine_decay_warmup", "warmup_t": 10, "t_initial": 90,
                        "warmup_lr_init": 1e-6, "lr_min": 1e-6}
    f = lr_lambda(cfg, 100)
    assert f(0) == pytest.approx(1e-3) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx((1e-6 + 0.5 * (1e-3 - 1e-6)) / 1e-3)
    assert f(100) == pytest.approx(1e-3) and f(500) == pytest.approx(1e-3)


def test_flops_per_token_counts_the_matmul_weights():
    from model import ModelConfig
    from model.dit import DIT
    from pretrain.flops import flops_per_token

    config = ModelConfig(n_blocks=2)
    weights = sum(p.numel() for n, p in DIT(config).named_parameters()
                  if p.ndim == 2 and not n.startswith(("vocab_embed", "sigma_map")))
    attention = 3 * 2 * 4 * config.length * config.hidden_size
    assert flops_per_token(config) == pytest.approx(6 * weights + attention, rel=0.01)


def test_one_rank_runs_zero_1_and_2_as_zero_0_but_keeps_offload():
    from pretrain.ds_config import single_rank_stage

    for stage in (1, 2):
        ds = {"zero_optimization": {"stage": stage, "overlap_comm": True}}
        assert single_rank_stage(ds, 1)["zero_optimization"] == {"stage": 0}
        assert single_rank_stage(ds, 2) == ds
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert single_rank_stage(offload, 1) == offload
    three = {"zero_optimization": {"stage": 3}}
    assert single_rank_stage(three, 1) == three
