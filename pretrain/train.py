"""``mdlm mode=train``: the DeepSpeed training loop.

One process per rank (the ``deepspeed`` launcher, torchrun or srun). Every check that can
fail (batch sizes, DeepSpeed config, shards, a checkpoint of another model) runs before the
model is built. The loop: micro-batches through the engine, an optimizer step, the EMA,
metrics, validation with the EMA weights (the bound and samples, ``pretrain.validation``)
every ``trainer.val_check_interval`` steps, a checkpoint every
``checkpointing.every_n_steps`` steps, at the end, and on SIGTERM/SIGUSR1 (then exit 0 so
a requeued job resumes).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from model import Diffusion, compile_backbone, from_run_config, tokenizer_ids
from pretrain import checkpointing, ds_config, optim, schedules
from pretrain import distributed as D
from pretrain.ema import EMA
from pretrain.flops import flops_per_token, peak_flops
from pretrain.metrics import MetricsLog
from pretrain.validation import check_sampling, validate

log = logging.getLogger(__name__)
# Written to the run directory when a signal stopped the run before trainer.max_steps: the
# slurm scripts requeue the job when they find it.
REQUEUE = "requeue"


class LossModule(torch.nn.Module):
    """What DeepSpeed wraps: its forward is the objective's loss, so ZeRO-3's parameter
    hooks see every forward."""

    def __init__(self, model: Diffusion):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, generator=None):
        return self.model.loss(input_ids, attention_mask, generator=generator)


class Stop:
    """Set by SIGTERM / SIGUSR1: save a checkpoint and exit 0."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def run_dir_of(cfg) -> Path:
    """The run directory, identical on every rank (rank 0's wins)."""
    return Path(D.broadcast(str(Path(str(cfg.checkpointing.save_dir)).expanduser()
                                .resolve())))


def model_config_for(cfg, tokenizer):
    precision = str(cfg.trainer.precision)
    autocast = ds_config.model_autocast(precision)
    if cfg.model.get("autocast", "auto") not in ("auto", None):
        autocast = cfg.model.autocast
    return from_run_config(cfg, autocast=autocast, **tokenizer_ids(tokenizer))


def check_resume(run_state: dict, model_config, tag_dir: Path, ds_cfg: dict,
                 world: int) -> None:
    stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
    if run_state["zero_stage"] != stage:
        raise ds_config.RunConfigError(
            f"cannot resume from {tag_dir}: it was written with ZeRO stage "
            f"{run_state['zero_stage']}, this run uses {stage}; set trainer.deepspeed_config "
            "to match, or export the weights and start a new run.")
    if stage >= 1 and run_state["world_size"] != world:
        raise ds_config.RunConfigError(
            f"cannot resume from {tag_dir}: its ZeRO-{stage} optimizer state is partitioned "
            f"over {run_state['world_size']} ranks and this run has {world}; resume with "
            f"{run_state['world_size']} ranks.")
    saved = run_state["model_config"]
    ours = model_config.to_dict()
    keys = ("backbone", "parameterization", "vocab_size", "mask_index", "length",
            "hidden_size", "cond_dim", "n_blocks", "n_heads", "time_conditioning", "T",
            "block_size")
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs run {ours.get(k)!r}" for k in keys
            if saved.get(k) != ours.get(k)]
    if diff:
        raise ds_config.RunConfigError(
            f"cannot resume from {tag_dir}: the model differs ({'; '.join(diff)}); use the "
            "same model settings, another checkpointing.save_dir, or "
            "checkpointing.resume_from_ckpt=False."
        )


def run(cfg):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = Stop()  # first: a signal during set-up must still end in a clean exit
    # ---------------------------------------------------------------- checks first
    ds_cfg = ds_config.build(cfg, D.expected_world_size())
    check_sampling(cfg)
    D.init(cfg.trainer.get("collective_timeout_minutes"),
           cfg.trainer.get("dead_rank_timeout_minutes"))
    rank, world, device = D.rank(), D.world_size(), D.device()
    run_dir = run_dir_of(cfg)
    checkpoint_dir = run_dir / "checkpoints"
    accumulation = ds_cfg["gradient_accumulation_steps"]
    micro, global_batch = int(cfg.loader.batch_size), int(cfg.loader.global_batch_size)
    from pretrain.data.datasets import open_split, tokenizer_for

    tokenizer = tokenizer_for(cfg)
    model_config = model_config_for(cfg, tokenizer)
    tag = checkpointing.resume_tag(checkpoint_dir) if cfg.checkpointing.resume_from_ckpt else None
    if not cfg.checkpointing.resume_from_ckpt and rank == 0:
        moved = checkpointing.set_aside_for_a_new_run(checkpoint_dir)
        if moved is not None:
            log.warning("checkpointing.resume_from_ckpt=False: the checkpoints already in %s "
                        "were moved to %s so this run's are not mixed with them.",
                        checkpoint_dir, moved)
    D.barrier()
    if tag is not None:
        check_resume(json.loads((checkpoint_dir / tag / checkpointing.RUN_FILE).read_text()),
                     model_config, checkpoint_dir / tag, ds_cfg, world)
    if not cfg.shards.get("build", True):
        _require_built(cfg, tokenizer)
    train_set = open_split(cfg, "train", tokenizer, progress=rank == 0)
    valid_set = open_split(cfg, "valid", tokenizer, progress=rank == 0)

    # ---------------------------------------------------------------- model and engine
    import deepspeed

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    compile_blocks = model_config.compile is True or (
        model_config.compile == "auto" and device.type == "cuda")
    late_compile = ds_config.compile_after_init(ds_cfg, compile_blocks)
    if compile_blocks and rank == 0:
        log.info("model.compile=%s: the blocks are compiled with torch.compile; the first "
                 "steps (and the first validation) wait for it", model_config.compile)
    # the checkpoints keep model.compile as set ("auto" stays "auto")
    model = Diffusion(model_config.replace(compile=compile_blocks and not late_compile))
    start_from = cfg.training.get("from_pretrained")
    if start_from and tag is None:  # a fresh run starts from these weights (not a resume)
        from model.checkpoint import load_weights

        source = load_weights(model.backbone, str(start_from),
                              trust=bool(cfg.checkpointing.get("trust", False)))
        if rank == 0:
            log.info("training.from_pretrained: the weights of %s", source)
    ds_config.apply_tf32(cfg, device.type)
    module = LossModule(model)
    optimizer = optim.build(module, cfg, ds_cfg)
    max_steps = int(cfg.trainer.max_steps)
    scheduler = schedules.build(optimizer, cfg, max_steps)
    # ZeRO-0 with fp32 weights: the loop clips, with the norm its NaN check takes anyway
    clip = float(ds_cfg.get("gradient_clipping") or 0.0)
    loop_clips = ds_config.loop_clips(ds_cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config={**ds_cfg, "gradient_clipping": 0.0} if loop_clips else ds_cfg)
    if late_compile:  # ZeRO-3 partitions and hooks the modules first
        compile_backbone(model.backbone)
    ema = EMA(engine.module.named_parameters(), cfg.training.ema) if cfg.training.ema > 0 else None

    from pretrain.data.sampler import ResumableSampler

    sampler = ResumableSampler(len(train_set), global_batch, rank, world, seed=cfg.seed)
    step, tokens_seen, skipped_total = 0, 0, 0
    if tag is not None:
        state = checkpointing.load(engine, checkpoint_dir, tag, ema, cfg.checkpointing.trust)
        sampler.load_state_dict(state["sampler"])
        step, tokens_seen, skipped_total = state["step"], state["tokens"], state["skipped"]
        saved = state.get("model_config", {})
        for key in ("sampling_eps_min", "sampling_eps_max"):  # a clip the search chose
            if key in saved and model.parameterization == "bd3lm":
                setattr(model.config, key, saved[key])
                setattr(model_config, key, saved[key])
        if not (checkpoint_dir / tag / f"rank_{rank:05d}.pt").is_file():
            _seed_rank(cfg.seed + step, rank)  # a rank the checkpoint did not have
        if rank == 0:
            checkpointing.discard_unpublished(checkpoint_dir, tag)
            log.info("resumed from %s at step %d", checkpoint_dir / tag, step)
    else:
        _seed_rank(cfg.seed, rank)
    resumed_step = step
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    # The loader's own generator: creating an iterator must not draw from the global RNG,
    # whose state a resumed run restores exactly.
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=micro, sampler=sampler, drop_last=True,
        generator=torch.Generator().manual_seed(int(cfg.seed)),
        num_workers=int(cfg.loader.num_workers), pin_memory=bool(cfg.loader.pin_memory)
        and device.type == "cuda", persistent_workers=False)
    metrics = MetricsLog(run_dir, rank == 0, step, max_steps, cfg.trainer.log_every_n_steps,
                         cfg)
    every = int(cfg.checkpointing.get("every_n_steps", 500))
    keep_last = int(cfg.checkpointing.get("keep_last", 2))
    max_skips = int(cfg.trainer.get("max_skipped_in_a_row", 10))
    fail_at = cfg.trainer.get("fail_at_step")
    fail_rank = int(cfg.trainer.get("fail_rank", 0))

    def run_state():
        return {"step": step, "tokens": tokens_seen, "skipped": skipped_total,
                "sampler": sampler.state_dict(), "model_config": model_config.to_dict(),
                "zero_stage": engine.zero_optimization_stage(), "world_size": world,
                "config": OmegaConf.to_container(cfg, resolve=True)}

    def save():
        return checkpointing.save(engine, checkpoint_dir, step, run_state(), ema, keep_last)

    peak = peak_flops()
    iterator = iter(loader)
    skipped_in_a_row = 0
    stage = engine.zero_optimization_stage()
    if world == 1 and stage == 0:
        engine.enable_backward_allreduce = False  # one rank: no gradients to average
    engine.train()
    while step < max_steps:
        started = time.perf_counter()
        # loss sum, real tokens, non-finite losses (or ZeRO-0 gradients): kept on the device
        # through the micro-steps and read once per optimizer step
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        for micro_step in range(accumulation):
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(loader)
                batch = next(iterator)
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            attention_mask = batch["attention_mask"].to(device, non_blocking=True)
            out = engine(input_ids, attention_mask)
            bad_loss = ~torch.isfinite(out.loss.detach())
            # A NaN/inf loss makes every gradient NaN, so the step is refused as a whole: by
            # DeepSpeed's own overflow check under ZeRO 1-3, by _skip_step under ZeRO-0.
            engine.backward(out.loss * torch.where(bad_loss, float("nan"), 1.0))
            totals += torch.stack([out.loss.detach().double(), out.token_mask.sum().double(),
                                   bad_loss.double()])
            if micro_step == accumulation - 1 and stage == 0:
                norm = _grad_norm(engine)
                totals[2] += (~torch.isfinite(norm)).double()
                summary = _read_step(totals, stop.requested, norm if loop_clips else None,
                                     device)
                if summary["bad"]:
                    _skip_step(engine)
                elif loop_clips:
                    _clip(engine, clip, summary["grad_norm"])
            engine.step()
        if stage > 0:
            summary = _read_step(totals, stop.requested, engine.get_global_grad_norm(), device)
        elif not loop_clips:
            summary["grad_norm"] = engine.get_global_grad_norm()
        bad = summary["bad"]
        if not engine.was_step_applied():  # DeepSpeed refused NaN/inf gradients itself
            bad = True
            if scheduler is not None:
                scheduler.step()  # it then skips the schedule too: keep lr a function of step
        sampler.advance(global_batch)
        step += 1
        if bad:
            skipped_total += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= max_skips:
                metrics.log(step, {"loss": float("nan"), "lr": 0.0, "skipped": skipped_total})
                raise FloatingPointError(
                    f"{skipped_in_a_row} steps in a row had a NaN/inf loss or gradient (last "
                    f"at step {step}); lower optim.lr, check the data, or resume from an "
                    "earlier checkpoint.")
        else:
            skipped_in_a_row = 0
            if ema is not None:
                ema.update()

        tokens_seen += int(summary["tokens"])
        seconds = time.perf_counter() - started
        record = {"loss": summary["loss"] / accumulation / world,
                  "lr": float(scheduler.get_last_lr()[0]) if scheduler else cfg.optim.lr,
                  "tokens": tokens_seen, "tokens_per_s": summary["tokens"] / seconds,
                  "step_seconds": seconds, "skipped": skipped_total}
        if peak is not None:
            record["mfu"] = record["tokens_per_s"] / world * flops_per_token(model_config) / peak
        if summary["grad_norm"] is not None:
            record["grad_norm"] = float(summary["grad_norm"])
        val_every = int(cfg.trainer.val_check_interval or 0)
        if val_every > 0 and step % val_every == 0:
            record.update({f"val/{k}": v for k, v in validate(
                engine, model, ema, valid_set, cfg, device, tokenizer=tokenizer, step=step,
                run_dir=run_dir, metrics=metrics).items()})
            # block diffusion's clip search may have moved the training clip: checkpoints
            # keep it
            model_config.sampling_eps_min = model.config.sampling_eps_min
            model_config.sampling_eps_max = model.config.sampling_eps_max
        metrics.log(step, record)

        if fail_at is not None and step == int(fail_at) and rank == fail_rank:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection (tests): die mid-run
        if summary["stop"]:
            save()
            if rank == 0:
                (run_dir / REQUEUE).write_text(f"stopped by a signal at step {step}\n")
                log.info("stop requested: saved step %d, exiting 0 for requeue", step)
            metrics.close()
            return 0
        if every > 0 and step % every == 0 and step < max_steps:
            save()
    if step > resumed_step or tag is None:  # never rewrite a published checkpoint
        save()
    metrics.close()
    D.barrier()
    return 0


def _read_step(totals: torch.Tensor, stop_requested: bool, grad_norm, device) -> dict:
    """The step's numbers summed over ranks, in one all-reduce and one host read: loss sum,
    real tokens, whether any rank saw a NaN/inf, whether any rank was asked to stop, and
    the global gradient norm (identical on every rank) when DeepSpeed computed one."""
    norm = float("nan") if grad_norm is None else grad_norm
    extra = torch.stack([torch.as_tensor(float(stop_requested), dtype=torch.float64,
                                         device=device),
                         torch.as_tensor(norm, device=device).double()])
    loss, tokens, bad, stops, norm_sum = D.all_reduce(torch.cat([totals, extra])).tolist()
    return {"loss": loss, "tokens": tokens, "bad": bad > 0, "stop": stops > 0,
            "grad_norm": None if grad_norm is None else norm_sum / D.world_size()}


def _grads(engine) -> list[torch.Tensor]:
    return [p.grad for p in engine.module.parameters() if p.grad is not None]


def _grad_norm(engine) -> torch.Tensor:
    """The global gradient norm under ZeRO-0 (gradients are already averaged over ranks
    after the last backward of a step), as a float32 device scalar."""
    grads = _grads(engine)
    if not grads:  # an optimizer that keeps its own gradient copies checks them itself
        return torch.zeros((), dtype=torch.float32, device=D.device())
    # float32 norms: fp16 gradients scaled by the loss scale overflow an fp16 norm
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2,
                                                                    dtype=torch.float32)))


def _clip(engine, max_norm: float, norm: float) -> None:
    """Scales the gradients by max_norm / (norm + 1e-6) when that is below 1, as torch's
    ``clip_grad_norm_`` does (which multiplies by exactly 1 otherwise)."""
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0:
        torch._foreach_mul_(_grads(engine), coefficient)


def _skip_step(engine) -> None:
    """A bad step under ZeRO-0 (whose optimizer takes any gradient): zero gradients and
    learning rate 0, so the weights do not move; the scheduler restores the rate at the
    next step (also when an optimizer wrapper refuses the step itself, see the loop)."""
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0


def _seed_rank(seed: int, rank: int) -> None:
    import random

    import numpy as np

    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _require_built(cfg, tokenizer) -> None:
    from pretrain.data.datasets import build_spec
    from pretrain.data.prepare import shard_dir
    from pretrain.data.shards import META

    for kind in ("train", "valid"):
        spec = build_spec(cfg, kind)
        directory = shard_dir(spec, tokenizer)
        if not (directory / META).is_file():
            raise ds_config.RunConfigError(
                f"the {kind} shards ({directory}) are not built and shards.build=False; run "
                "`python -m pretrain.data.prepare` with this run's overrides first."
            )
