"""Every command of the MDLM release's README, run end to end as ``mdlm`` with its own
overrides; only paths and sizes change (``adapt`` enforces that).

The stand-ins live in a hub cache built here and read offline, so the hub names of the
commands stay as they are: ``gpt2`` (a byte-level BPE trained on CPython's documentation),
``gpt2-large`` (a one-layer GPT-2 on that tokenizer, the generative-perplexity judge),
``bert-base-uncased`` (a word-level BERT-style tokenizer) and ``kuleshov-group/mdlm-owt``
(a 2-block DiT in the HF layout). Release-format Lightning ``.ckpt`` files stand in for the
released ``mdlm.ckpt``, ``ar.ckpt`` and ``sedd.ckpt``; local JSONL files for OpenWebText's
and LM1B's documents.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import Diffusion, ModelConfig, save_pretrained
from tests.conftest import CPU_ONLY, randomize_

pytestmark = pytest.mark.slow

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LENGTH = 64
# What a command may change: where things are, and how big they are.
PATH_KEYS = {"eval.checkpoint_path", "data.train", "data.valid", "checkpointing.save_dir",
             "hydra.run.dir"}
SIZE_KEYS = {"model.length", "model.hidden_size", "model.cond_dim", "model.n_blocks",
             "model.n_heads", "sampling.steps", "sampling.num_sample_batches",
             "sampling.stride_length", "loader.global_batch_size", "loader.batch_size",
             "loader.eval_batch_size", "loader.num_workers", "trainer.max_steps",
             "trainer.val_check_interval", "trainer.limit_val_batches",
             "trainer.log_every_n_steps", "eval.perplexity_batch_size",
             "checkpointing.every_n_steps", "lr_scheduler.num_warmup_steps",
             "shards.num_proc", "shards.docs_per_shard", "algo.T",
             "loader.eval_global_batch_size"}

# The release README's commands, verbatim after `python main.py` / `python -u -m main`.
RELEASE = {
    "sample_hf": """mode=sample_eval eval.checkpoint_path=kuleshov-group/mdlm-owt
        data=openwebtext-split model.length=1024 sampling.predictor=ddpm_cache
        sampling.steps=1000 loader.eval_batch_size=1 sampling.num_sample_batches=10
        backbone=hf_dit""",
    "sample_ckpt": """mode=sample_eval eval.checkpoint_path=/path/to/checkpoint/mdlm.ckpt
        data=openwebtext-split model.length=1024 sampling.predictor=ddpm_cache
        sampling.steps=10000 loader.eval_batch_size=1 sampling.num_sample_batches=1
        backbone=dit""",
    "semi_ar": """mode=sample_eval eval.checkpoint_path=kuleshov-group/mdlm-owt
        data=openwebtext-split parameterization=subs model.length=1024
        sampling.predictor=ddpm_cache sampling.steps=1000 loader.eval_batch_size=1
        sampling.num_sample_batches=2 sampling.semi_ar=True sampling.stride_length=512
        sampling.num_strides=2 backbone=hf_dit""",
    "train_mdlm": """model=small data=openwebtext-split wandb.name=mdlm-owt
        parameterization=subs model.length=1024 eval.compute_generative_perplexity=True
        sampling.steps=1000""",
    "train_ar": """loader.batch_size=64 loader.eval_batch_size=64 trainer.max_steps=1000000
        model=small data=lm1b wandb.name=ar-lm1b parameterization=ar model.length=128
        checkpointing.save_dir=${SAVE_CKPT_DIR} eval.compute_generative_perplexity=True
        sampling.steps=1024 backbone=ar""",
    "ppl_mdlm": """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16
        data=openwebtext-split model=small parameterization=subs backbone=dit
        model.length=1024 eval.checkpoint_path=/path/to/checkpoint/mdlm.ckpt
        +wandb.offline=true""",
    "ppl_ar": """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16
        data=openwebtext-split model=small-ar parameterization=ar backbone=ar
        model.length=1024 eval.checkpoint_path=/path/to/checkpoint/ar.ckpt
        +wandb.offline=true""",
    "ppl_sedd": """mode=ppl_eval loader.batch_size=16 loader.eval_batch_size=16
        data=openwebtext-split model=small parameterization=sedd backbone=dit
        model.length=1024 eval.checkpoint_path=/path/to/checkpoint/sedd.ckpt
        time_conditioning=True sampling.predictor=analytic +wandb.offline=true""",
    # the BD3-LM release README's commands (block size 4)
    "bd3lm_sample": """loader.eval_batch_size=1 model=small algo=bd3lm algo.T=5000
        algo.backbone=hf_dit data=openwebtext-split model.length=2048 block_size=4
        wandb=null mode=sample_eval
        eval.checkpoint_path=kuleshov-group/bd3lm-owt-block_size4 model.attn_backend=sdpa
        sampling.nucleus_p=0.9 sampling.kv_cache=true
        sampling.logdir=$PWD/sample_logs/samples_genlen_bd3lm_blocksize4""",
    "bd3lm_ppl": """loader.eval_batch_size=16 model=small algo=bd3lm algo.backbone=hf_dit
        data=openwebtext-split data.insert_valid_special=False model.length=1024
        model.attn_backend=flex block_size=4
        eval.checkpoint_path=kuleshov-group/bd3lm-owt-block_size4 wandb=null
        mode=ppl_eval""",
    "bd3lm_train": """loader.global_batch_size=512 loader.eval_global_batch_size=512
        loader.batch_size=16 loader.eval_batch_size=16 model=small algo=bd3lm
        algo.clip_search_widths=[0.5,0.6,0.7,0.8,0.9] data=openwebtext-split
        model.length=1024 block_size=4 wandb.name=bd3lm-owt-block_size4 mode=train
        model.attn_backend=flex training.resample=True
        training.from_pretrained=kuleshov-group/bd3lm-owt-block_size1024-pretrain""",
}


def adapt(name: str, **changes) -> list[str]:
    """The release's command ``name`` with the values of ``changes`` (dots as ``__``)
    replaced or added; anything but a path or a size is refused."""
    args = shlex.split(RELEASE[name])
    changes = {k.replace("__", "."): str(v) for k, v in changes.items()}
    bad = set(changes) - PATH_KEYS - SIZE_KEYS
    assert not bad, f"{bad} are neither paths nor sizes"
    out = []
    for arg in args:
        key = arg.split("=", 1)[0]
        out.append(f"{key}={changes.pop(key)}" if key in changes else arg)
    return out + [f"{k}={v}" for k, v in changes.items()]


# ----------------------------------------------------------------------------- stand-ins
def _snapshot(hub: Path, repo: str) -> Path:
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    directory = root / "snapshots" / COMMIT
    directory.mkdir(parents=True)
    return directory


def _model(vocab_size: int, seed: int, **changes) -> Diffusion:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, mask_index=vocab_size - 1, length=LENGTH,
                         hidden_size=64, cond_dim=32, n_blocks=2, n_heads=4, **changes)
    return randomize_(Diffusion(config), seed=seed, std=0.05).eval()


def _release_ckpt(path: Path, model: Diffusion, tokenizer, **top) -> None:
    """A Lightning .ckpt as the release writes it: raw weights (the EMA + 0.01), the EMA
    shadow params in the backbone's parameter order, the Hydra config and the tokenizer."""
    import copy

    from tests.model.test_checkpoint import release_config, write_release_ckpt

    c = model.config
    config = release_config(model={
        "name": "small", "type": "ddit", "hidden_size": c.hidden_size, "cond_dim": c.cond_dim,
        "length": c.length, "n_blocks": c.n_blocks, "n_heads": c.n_heads,
        "scale_by_sigma": True, "dropout": 0.1}, **top)
    raw = copy.deepcopy(model.backbone)
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.01)
    write_release_ckpt(path, raw, config, [p.detach().clone()
                                           for p in model.backbone.parameters()], tokenizer)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from pretrain.data.builtin import documents
    from tests.pretrain.data_helpers import word_tokenizer, write_gpt2_style

    root = tmp_path_factory.mktemp("release")
    hub = root / "hub"
    train_docs, valid_docs = documents("train"), documents("validation")
    gpt2, judge = _snapshot(hub, "gpt2"), _snapshot(hub, "gpt2-large")
    write_gpt2_style(gpt2, train_docs, 512)
    write_gpt2_style(judge, train_docs, 512)
    tok = AutoTokenizer.from_pretrained(str(judge))
    config = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config.save_pretrained(str(gpt2))  # the hub's repositories carry one
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(judge))
    bert = _snapshot(hub, "bert-base-uncased")
    word_tokenizer("bert").save_pretrained(str(bert))
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))

    from model import tokenizer_ids
    from pretrain.data.tokenizers import get_tokenizer

    gpt2_tok = get_tokenizer(str(gpt2))
    vocab = tokenizer_ids(gpt2_tok)["vocab_size"]
    save_pretrained(_model(vocab, seed=1), _snapshot(hub, "kuleshov-group/mdlm-owt"))
    ckpts = root / "checkpoints"
    ckpts.mkdir()
    _release_ckpt(ckpts / "mdlm.ckpt", _model(vocab, seed=2), gpt2_tok)
    _release_ckpt(ckpts / "ar.ckpt", _model(vocab, seed=3, backbone="ar",
                                            parameterization="ar"), gpt2_tok,
                  backbone="ar", parameterization="ar")
    _release_ckpt(ckpts / "sedd.ckpt", _model(vocab, seed=4, parameterization="sedd",
                                              time_conditioning=True), gpt2_tok,
                  parameterization="sedd", time_conditioning=True)

    # BD3-LM, and the MDLM (one block of the whole length) its fine-tuning starts from
    for repo, block, seed in (("kuleshov-group/bd3lm-owt-block_size4", 4, 5),
                              ("kuleshov-group/bd3lm-owt-block_size1024-pretrain", LENGTH, 6)):
        _bd3lm_hf(_snapshot(hub, repo), _model(vocab, seed=seed, parameterization="bd3lm",
                                               block_size=block))

    corpora = root / "corpora"
    corpora.mkdir()
    for name, docs in (("owt-train", train_docs), ("owt-valid", valid_docs[:40])):
        (corpora / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs))
    from tests.pretrain.data_helpers import corpus

    for name, docs in (("lm1b-train", corpus(600, seed=1)), ("lm1b-valid", corpus(60, seed=2))):
        (corpora / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
    env = dict(os.environ, **CPU_ONLY, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MDLM_DATA_DIR=str(root / "data"))
    return {"root": root, "env": env, "ckpts": ckpts, "corpora": corpora}


def _bd3lm_hf(directory: Path, model: Diffusion) -> None:
    """A BD3-LM release HF directory: config.json (model_type bd3lm) and its weights, with
    the clip bounds as top-level tensors."""
    from safetensors.torch import save_file

    c = model.config
    state = {"backbone." + k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    state.update(sampling_eps_min=torch.tensor(1e-3), sampling_eps_max=torch.tensor(1.0))
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "bd3lm", "architectures": ["BD3LM"], "block_size": c.blocks,
        "vocab_size": c.vocab_size, "model_length": c.length, "cross_attn": True,
        "adaln": True, "attn_backend": "flex", "causal": False, "hidden_dim": c.hidden_size,
        "cond_dim": c.cond_dim, "n_blocks": c.n_blocks, "n_heads": c.n_heads,
        "dropout": 0.1, "time_conditioning": False, "var_min": True,
        "sampling_eps_min": 1e-3, "sampling_eps_max": 1.0, "return_dict": False}))


def mdlm(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pretrain", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def owt(s) -> dict:
    return {"data__train": s["corpora"] / "owt-train.jsonl",
            "data__valid": s["corpora"] / "owt-valid.jsonl", "shards__num_proc": 1}


def read_samples(run: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    return rows, json.loads((run / "samples_summary.json").read_text())


# ----------------------------------------------------------------------------- commands
def test_sample_eval_from_the_hf_model(tmp_path, stand_ins):
    mdlm(adapt("sample_hf", model__length=LENGTH, sampling__steps=50,
               hydra__run__dir=tmp_path), stand_ins["env"])
    rows, summary = read_samples(tmp_path)
    assert len(rows) == 10 and all(len(r["token_ids"]) == LENGTH for r in rows)
    assert summary["predictor"] == "ddpm_cache" and summary["checkpoint"].endswith("mdlm-owt")
    assert all(r["nfe"] <= 51 for r in rows)


def test_sample_eval_from_a_local_checkpoint(tmp_path, stand_ins):
    mdlm(adapt("sample_ckpt", model__length=LENGTH, sampling__steps=200,
               eval__checkpoint_path=stand_ins["ckpts"] / "mdlm.ckpt",
               hydra__run__dir=tmp_path), stand_ins["env"])
    rows, summary = read_samples(tmp_path)
    assert len(rows) == 1 and len(rows[0]["token_ids"]) == LENGTH
    assert rows[0]["nfe"] <= LENGTH + 1  # ddpm_cache: a network call per change at most


def test_semi_autoregressive_samples(tmp_path, stand_ins):
    mdlm(adapt("semi_ar", model__length=LENGTH, sampling__steps=20,
               sampling__stride_length=LENGTH // 2, hydra__run__dir=tmp_path),
         stand_ins["env"])
    rows, _ = read_samples(tmp_path)
    assert len(rows) == 2 and all(len(r["token_ids"]) == 2 * LENGTH for r in rows)


def test_train_mdlm_from_scratch_with_generative_perplexity(tmp_path, stand_ins):
    done = mdlm(adapt("train_mdlm", model__length=LENGTH, sampling__steps=20,
                      model__hidden_size=64, model__cond_dim=32, model__n_blocks=2,
                      model__n_heads=4, trainer__max_steps=6, loader__global_batch_size=8,
                      loader__batch_size=4, loader__eval_batch_size=4,
                      trainer__val_check_interval=6, trainer__limit_val_batches=2,
                      sampling__num_sample_batches=1, lr_scheduler__num_warmup_steps=2,
                      hydra__run__dir=tmp_path, **owt(stand_ins)), stand_ins["env"])
    assert "wandb.name" in done.stdout + done.stderr  # the one-line notice
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    last = records[-1]
    assert last["val/gen_ppl"] > 1 and last["val/ppl"] > 1 and last["val/entropy"] > 0
    samples = (tmp_path / "samples" / "step_00000006.jsonl").read_text().splitlines()
    assert len(samples) == 4  # loader.eval_batch_size x sampling.num_sample_batches
    assert (tmp_path / "checkpoints" / "latest").is_file()


def test_train_ar_on_lm1b(tmp_path, stand_ins):
    corpora = stand_ins["corpora"]
    mdlm(adapt("train_ar", loader__batch_size=4, loader__eval_batch_size=4,
               trainer__max_steps=4, model__length=32, sampling__steps=32,
               model__hidden_size=64, model__cond_dim=32, model__n_blocks=2, model__n_heads=4,
               checkpointing__save_dir=tmp_path / "save", loader__global_batch_size=8,
               trainer__val_check_interval=4, sampling__num_sample_batches=1,
               data__train=corpora / "lm1b-train.txt", data__valid=corpora / "lm1b-valid.txt",
               shards__num_proc=1, hydra__run__dir=tmp_path / "hydra"), stand_ins["env"])
    records = [json.loads(line) for line in
               (tmp_path / "save" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and records[-1]["val/gen_ppl"] > 1
    assert (tmp_path / "save" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("name, ckpt", [("ppl_mdlm", "mdlm"), ("ppl_ar", "ar"),
                                        ("ppl_sedd", "sedd")])
def test_ppl_eval_of_the_released_checkpoints(tmp_path, stand_ins, name, ckpt):
    done = mdlm(adapt(name, model__length=LENGTH, hydra__run__dir=tmp_path,
                      eval__checkpoint_path=stand_ins["ckpts"] / f"{ckpt}.ckpt",
                      **owt(stand_ins)), stand_ins["env"])
    assert "wandb.offline" in done.stdout + done.stderr
    result = json.loads((tmp_path / "ppl_eval.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1])["nll"] == result["nll"]
    assert result["parameterization"] == {"mdlm": "subs"}.get(ckpt, ckpt)
    assert result["tokens"] > 0 and 1 < result["ppl"] < 1e4
    assert result["exact"] == (ckpt == "ar") and result["ema"]


# ------------------------------------------------------------- the BD3-LM release's commands
def test_bd3lm_samples_past_its_context_from_the_hf_model(tmp_path, stand_ins):
    """Twice the trained length, block by block with the release's first-hitting sampler
    (algo.T is the number of steps), nucleus 0.9 and the KV cache."""
    done = mdlm(adapt("bd3lm_sample", model__length=2 * LENGTH, algo__T=50,
                      hydra__run__dir=tmp_path), stand_ins["env"])
    rows, summary = read_samples(tmp_path)
    assert len(rows) == 1 and len(rows[0]["token_ids"]) == 2 * LENGTH
    assert summary["predictor"] == "first_hitting" and summary["top_p"] == 0.9
    assert rows[0]["nfe"] == 2 * LENGTH - 1  # one network call per token, but the BOS
    assert "sampling.logdir" in done.stderr and "algo=bd3lm is read as" in done.stderr


def test_bd3lm_likelihood_from_the_hf_model(tmp_path, stand_ins):
    mdlm(adapt("bd3lm_ppl", model__length=LENGTH, loader__eval_batch_size=4,
               hydra__run__dir=tmp_path, **owt(stand_ins)), stand_ins["env"])
    result = json.loads((tmp_path / "ppl_eval.json").read_text())
    assert result["parameterization"] == "bd3lm" and 1 < result["ppl"] < 1e6
    assert result["stderr"] > 0
    # data.insert_valid_special=False: plain blocks of model.length tokens, as the release
    data = Path(stand_ins["env"]["MDLM_DATA_DIR"])
    assert list(data.glob(f"owt-valid.jsonl-*-validation-L{LENGTH}-wrap*-unframed-*"))


def test_bd3lm_fine_tunes_from_the_pretrained_mdlm_with_the_clip_search(tmp_path, stand_ins):
    done = mdlm(adapt("bd3lm_train", model__length=LENGTH, model__hidden_size=64,
                      model__cond_dim=32, model__n_blocks=2, model__n_heads=4,
                      trainer__max_steps=4, loader__global_batch_size=8,
                      loader__eval_global_batch_size=8, loader__batch_size=4,
                      loader__eval_batch_size=4, trainer__val_check_interval=4,
                      trainer__limit_val_batches=2, sampling__num_sample_batches=1,
                      sampling__steps=8, lr_scheduler__num_warmup_steps=2,
                      hydra__run__dir=tmp_path, **owt(stand_ins)), stand_ins["env"])
    assert "training.from_pretrained: the weights of hub model" in done.stdout + done.stderr
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["val/ppl"] > 1
    assert 0 < last["val/clip_min"] < last["val/clip_max"] <= 1.0 + 1e-9
    assert sum(k.startswith("val/clip_var_") for k in last) > 20  # the release's windows
