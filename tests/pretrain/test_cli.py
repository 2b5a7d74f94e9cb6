import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

import pretrain.cli  # noqa: F401  (registers the resolvers)


def compose_config(*overrides):
    with initialize_config_module(config_module="pretrain.config", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_defaults_are_the_releases():
    cfg = compose_config()
    assert (cfg.mode, cfg.backbone, cfg.parameterization, cfg.T) == ("train", "dit", "subs", 0)
    assert cfg.time_conditioning is False and cfg.subs_masking is False and cfg.seed == 1
    assert dict(cfg.model) == {
        "name": "small", "type": "ddit", "hidden_size": 768, "cond_dim": 128, "length": 1024,
        "n_blocks": 12, "n_heads": 12, "scale_by_sigma": True, "dropout": 0.1,
        "tie_word_embeddings": False, "attn_backend": "auto", "autocast": "auto",
        "compile": "auto", "loss_path": "masked", "loss_chunk_rows": 0,
        "activation_checkpointing": False}
    assert cfg.noise.type == "loglinear" and cfg.data.train == "openwebtext"
    assert cfg.data.tokenizer_name_or_path == "gpt2" and cfg.data.wrap is True
    assert cfg.lr_scheduler.num_warmup_steps == 2500
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (
        3e-4, 0.9, 0.999, 1e-8)
    assert cfg.optim.weight_decay == 0
    assert cfg.training.ema == 0.9999 and cfg.training.antithetic_sampling is True
    assert cfg.training.sampling_eps == 1e-3
    assert cfg.loader.global_batch_size == 512
    assert cfg.sampling.predictor == "ddpm_cache" and cfg.sampling.steps == 128
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.precision == "bf16"
    assert cfg.trainer.val_check_interval == 10_000 and cfg.trainer.max_steps == 1_000_000
    assert cfg.eval.gen_ppl_eval_model_name_or_path == "gpt2-large"
    assert cfg.eval.perplexity_batch_size == 8 and cfg.eval.disable_ema is False
    assert cfg.checkpointing.resume_from_ckpt is True


def test_interpolations_resolve():
    cfg = compose_config("trainer.devices=4", "trainer.num_nodes=2", "loader.global_batch_size=512")
    assert cfg.loader.batch_size == 64 and cfg.trainer.accumulate_grad_batches == 1
    cfg = compose_config("trainer.devices=4", "loader.batch_size=32")
    assert cfg.trainer.accumulate_grad_batches == 4
    cfg = compose_config("lr_scheduler=cosine_decay_warmup", "trainer.max_steps=1000")
    assert cfg.lr_scheduler.warmup_t == 100 and cfg.lr_scheduler.t_initial == 900


@pytest.mark.parametrize("group, option", [
    ("model", "tiny"), ("model", "medium"), ("model", "tiny-ar"), ("model", "small-ar"),
    ("noise", "linear"), ("noise", "geometric"), ("noise", "cosine"), ("noise", "cosinesqr"),
    ("data", "lm1b"), ("data", "openwebtext-split"), ("data", "text8"), ("data", "wikitext2"),
])
def test_groups_compose(group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg[group] is not None
    if option == "lm1b":
        assert cfg.data.tokenizer_name_or_path == "bert-base-uncased" and not cfg.data.wrap


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pretrain", *args, f"hydra.run.dir={cwd}"],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_unbuilt_mode_says_so_in_one_sentence(capsys, monkeypatch):
    from pretrain import cli

    monkeypatch.setitem(cli.MODES, "distill", ("pretrain.distill", "run", "distillation"))
    cfg = compose_config("mode=distill")
    with pytest.raises(SystemExit) as stop:
        cli.dispatch(cfg)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "mdlm: mode=distill is not available in this version: distillation "
        "(pretrain.distill) is not built yet."]


@pytest.mark.parametrize("args, message", [
    (["parameterization=d3pm"], "parameterization=d3pm is a discrete-time objective"),
    (["parameterization=sedd"], "time_conditioning=True"),
    (["mode=bogus"], "mode=bogus is not a mode"),
    (["backbone=hf_dit"], "eval.checkpoint_path"),
])
def test_bad_settings_stop_before_anything_runs(tmp_path, args, message):
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_console_script_points_at_the_cli():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mdlm"]
    assert script.value == "pretrain.cli:main"


@pytest.mark.parametrize("typo, suggestion", [
    ("trainer.devicess=2", "did you mean trainer.devices?"),
    ("sampling.predictr=ddpm", "did you mean sampling.predictor?"),
    ("model.attn_backnd=sdpa", "did you mean model.attn_backend?"),
])
def test_misspelt_key_suggests_the_closest(tmp_path, typo, suggestion):
    done = run_cli(typo, "model=tiny", cwd=tmp_path)
    assert done.returncode == 2 and suggestion in done.stderr
    assert "Traceback" not in done.stderr


def test_release_only_keys_are_accepted_with_a_notice(tmp_path):
    done = run_cli("wandb.name=mdlm-owt", "+wandb.offline=true", "trainer.devices=8",
                   "trainer.accelerator=gpu", "mode=bogus", cwd=tmp_path)
    notes = [line for line in done.stderr.splitlines() if line.startswith("mdlm: note:")]
    assert [n.split()[2] for n in notes] == ["wandb.name", "wandb.offline", "trainer.devices",
                                             "trainer.accelerator"]
    assert "mode=bogus is not a mode" in done.stderr  # the run went on to its own checks


def test_lightning_strategy_and_callbacks_are_noted_or_renamed(tmp_path, capsys):
    from pretrain.cli import translate_lightning

    args = ["strategy=ddp", "strategy.find_unused_parameters=false", "model=tiny",
            "callbacks.checkpoint_every_n_steps.every_n_train_steps=20000",
            "+callbacks.checkpoint_every_n_steps.save_last=True", "seed=3"]
    assert translate_lightning(args) == ["model=tiny", "checkpointing.every_n_steps=20000",
                                         "seed=3"]
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 4 and all(n.startswith("mdlm: note:") for n in notes)
    done = run_cli(*args, "mode=bogus", cwd=tmp_path)
    assert "mode=bogus is not a mode" in done.stderr  # Hydra never saw the Lightning keys


def test_the_bd3lm_releases_data_switches_reach_both_splits():
    """data.insert_*: ours too, in whichever data group; the release's scripts sometimes
    add them with a "+", which is read as setting them."""
    from pretrain.cli import translate_algo
    from pretrain.data.datasets import build_spec

    assert (compose_config("data=wikitext2").data.insert_valid_special,
            compose_config().data.insert_train_eos) == (True, True)
    argv = translate_algo(["data=openwebtext-split", "data.insert_train_special=False",
                           "+data.insert_valid_eos=False"])
    assert argv[1:] == ["data.insert_train_special=False", "data.insert_valid_eos=False"]
    cfg = compose_config(*argv)
    train, valid = build_spec(cfg, "train"), build_spec(cfg, "valid")
    assert (train.special, train.doc_eos, valid.special, valid.doc_eos) == (
        False, True, True, False)
