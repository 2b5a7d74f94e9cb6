"""``mdlm mode=ppl_eval``: test (and zero-shot) perplexity of a checkpoint.

The model comes from ``eval.checkpoint_path`` (an HF directory or hub id, a release
``.ckpt``, or one of our runs; EMA weights unless ``eval.disable_ema=True``); the run's
``backbone``, ``parameterization``, ``time_conditioning``, ``T``, ``subs_masking``, noise,
``model.length`` and ``training.*`` settings apply to it, as in the release. Pickled
checkpoints are read without running code from them unless ``eval.trust_checkpoint=True``
(``model.checkpoint.safe``). The data is
``data.valid`` (its validation split), or with ``eval.zero_shot=True`` each of
``eval.zero_shot_datasets``.
Every rank evaluates its share of the batches; the sums are reduced exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import open_dict

from evaluation import perplexity, shard_batches, zero_shot_markdown
from model import CheckpointError, load_pretrained, tokenizer_ids
from pretrain import distributed as D
from pretrain.data.shards import atomic_write_bytes


def load_model(cfg, tokenizer, device):
    path = str(cfg.eval.checkpoint_path or "")
    if not path:
        raise CheckpointError("mode=ppl_eval needs eval.checkpoint_path: a run directory, a "
                              ".ckpt file, an HF directory or a hub id such as "
                              "kuleshov-group/mdlm-owt.")
    training = cfg.training
    overrides = dict(
        parameterization=cfg.parameterization, time_conditioning=cfg.time_conditioning,
        T=cfg.T, subs_masking=cfg.subs_masking, noise=dict(cfg.noise),
        antithetic_sampling=training.antithetic_sampling,
        importance_sampling=training.importance_sampling,
        change_of_variables=training.change_of_variables, sampling_eps=training.sampling_eps,
        backbone="ar" if cfg.backbone == "ar" else "dit",
        attn_backend=cfg.model.get("attn_backend", "auto"),
        autocast=cfg.model.get("autocast", "auto"),
    )
    if cfg.parameterization != "bd3lm":
        overrides["length"] = int(cfg.model.length)
    elif cfg.get("block_size") is not None:
        # block diffusion keeps its context (the sampler's window), its clip bounds and
        # ignore_bos from the checkpoint; block_size when given
        overrides["block_size"] = int(cfg.block_size)
    model = load_pretrained(path, use_ema=not cfg.eval.disable_ema, device=device,
                            trust=bool(cfg.eval.get("trust_checkpoint", False)), **overrides)
    ids = tokenizer_ids(tokenizer)
    if (model.vocab_size, model.mask_index) != (ids["vocab_size"], ids["mask_index"]):
        raise CheckpointError(
            f"the checkpoint has vocab_size={model.vocab_size}, mask id {model.mask_index}, "
            f"but data.tokenizer_name_or_path={cfg.data.tokenizer_name_or_path} gives "
            f"{ids['vocab_size']} and {ids['mask_index']}; use the checkpoint's tokenizer.")
    model.config.bos_index, model.config.eos_index = ids["bos_index"], ids["eos_index"]
    return model


def evaluate_split(cfg, model, tokenizer, device) -> dict:
    from pretrain.data.datasets import build_spec, open_split

    dataset = open_split(cfg, "valid", tokenizer, progress=D.rank() == 0)
    batches = shard_batches(dataset, int(cfg.loader.eval_batch_size), D.rank(),
                            D.world_size())
    result = perplexity(model, batches, num_mc_samples=int(cfg.eval.num_mc_samples),
                        seed=int(cfg.seed), reduce=D.all_reduce, device=device)
    spec = build_spec(cfg, "valid")
    result.update(dataset=spec.dataset, split=spec.split, exact=model.parameterization == "ar",
                  parameterization=model.parameterization, T=model.T,
                  checkpoint=str(cfg.eval.checkpoint_path), ema=not cfg.eval.disable_ema)
    return result


def setup(cfg):
    """Process group, tokenizer and checkpoint of an evaluation or sampling run:
    (device, tokenizer, model)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    D.init(cfg.trainer.get("collective_timeout_minutes"),
           cfg.trainer.get("dead_rank_timeout_minutes"))
    device = D.device()
    from pretrain.data.datasets import tokenizer_for

    tokenizer = tokenizer_for(cfg)
    return device, tokenizer, load_model(cfg, tokenizer, device)


def run(cfg):
    device, tokenizer, model = setup(cfg)
    out_dir = Path(str(cfg.checkpointing.save_dir)).expanduser()
    if cfg.eval.get("zero_shot", False):
        results = {}
        for name in cfg.eval.zero_shot_datasets:
            with open_dict(cfg):
                cfg.data.valid = name
            results[str(name)] = evaluate_split(cfg, model, tokenizer, device)
        output = {"zero_shot": results}
        default = out_dir / "zero_shot.json"
    else:
        output = evaluate_split(cfg, model, tokenizer, device)
        default = out_dir / "ppl_eval.json"
    if D.rank() == 0:
        path = Path(str(cfg.eval.get("output_path") or default)).expanduser()
        atomic_write_bytes(path, (json.dumps(output, indent=1) + "\n").encode())
        if "zero_shot" in output:
            table = zero_shot_markdown(output["zero_shot"], str(cfg.eval.checkpoint_path))
            atomic_write_bytes(path.with_suffix(".md"), table.encode())
            print(table)
        print(json.dumps(output))
    D.barrier()
    return 0
