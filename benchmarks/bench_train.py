"""Training-step speed and memory, each against a baseline measured in the same run.

Suites (``--suite``, default ``loss``):

- ``loss``: forward + backward of one micro-batch (L = 1024, GPT-2's V = 50,258, fixed t)
  on the same network, alternated: a plain full-logits loss (log-softmax, gather, weight),
  the release's full path (``model.loss_path=full``) and the masked-only chunked path
  (``masked``), at t = 0.5 (half the positions masked). Tokens/s and the step's peak
  memory (CUDA: allocated bytes; CPU: resident set high-water mark above the state before
  the step), for SUBS and AR (``--with-checkpointing``: also the masked path with
  activation checkpointing per block; ``--padding-baseline``: also the masked path without
  padding the vocabulary, which CUDA's path pads to a multiple of 64). For SUBS also the
  FLOP ceiling of the masked path's speedup: the plain loss's training FLOPs over its own.
- ``engine``: the optimizer-bound setting: ``mdlm mode=train`` (model=tiny,
  data=builtin, L = 64, batch 1, fp32, one rank, EMA on; also with ``model.compile=True``,
  with ``optim.impl=torch``, and without the EMA and gradient clipping) against a plain
  loop of the same loss with torch's AdamW, median seconds per step after the first five.
- ``optimizer``: DeepSpeed's CPU Adam against torch's AdamW at 100M parameters
  (``benchmarks/bench_optim.py``).
- ``gpu``: through the DeepSpeed engine on a GPU: tokens/s, MFU and peak memory for the
  models given, in bf16, compiled and not, at the largest micro-batch that fits.

Each suite prints a table and one JSON line.

    python benchmarks/bench_train.py --suite loss --models tiny,small
    python benchmarks/bench_train.py --suite engine
    python benchmarks/bench_train.py --suite gpu --models small --precision bf16
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a plain checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import Diffusion, ModelConfig, projection  # noqa: E402
from model.config import ARCHITECTURES  # noqa: E402
from pretrain.flops import flops_per_token, peak_flops  # noqa: E402
from pretrain.optim import deepspeed_adamw  # noqa: E402

GPT2_VOCAB = 50258


# ---------------------------------------------------------------------- memory probes
def _return_freed_memory() -> None:
    """Makes glibc give every allocation of 64 KiB or more back to the system when freed,
    so the resident set follows the tensors alive (CPU peak-memory measurements)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(device) -> int:
    """Starts a peak-memory window; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the resident-set high-water mark to the current size
    return _rss_bytes("VmRSS")


def peak_since(device, start: int) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _rss_bytes("VmHWM") - start


# ---------------------------------------------------------------------- loss suite
def plain_loss(model: Diffusion, x0, t, generator):
    """The straightforward full-logits loss: B x L x V logits, log-softmax, gather, weight
    (SUBS at masked positions; next-token cross entropy for AR)."""
    if model.parameterization == "ar":
        log_p = model.backbone.output_layer(model.backbone.trunk(x0[:, :-1])).log_softmax(-1)
        return -log_p.gather(-1, x0[:, 1:, None]).mean()
    n = model.noised(x0, t, generator)
    logits = model.backbone(n.xt, n.conditioning)
    nll = -logits.log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
    weight = (n.dsigma / torch.expm1(n.sigma))[:, None] * (n.xt == model.mask_index)
    return (nll * weight).sum() / x0.numel()


def step_loss(kind: str, model: Diffusion, x0, t, generator):
    # set for every kind, the plain loss included: its trunk reads the checkpointing switch
    model.config.activation_checkpointing = kind == "masked_ckpt"
    if kind == "plain":
        return plain_loss(model, x0, t, generator)
    model.config.loss_path = "full" if kind == "full" else "masked"
    if kind != "masked_unpadded":
        return model.loss(x0, t=t, generator=generator).loss
    # the masked path without padding the vocabulary (model.projection.PAD_VOCAB_TO)
    with mock.patch.dict(projection.PAD_VOCAB_TO, {x0.device.type: 1}):
        return model.loss(x0, t=t, generator=generator).loss


def loss_suite(args) -> dict:
    _return_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for objective in args.objectives.split(","):
        for size in args.models.split(","):
            ar = objective == "ar"
            config = ModelConfig(**ARCHITECTURES[size], length=args.length, dropout=0.0,
                                 vocab_size=args.vocab, mask_index=args.vocab - 1,
                                 backbone="ar" if ar else "dit", parameterization=objective,
                                 autocast=args.autocast, loss_chunk_rows=args.chunk_rows)
            torch.manual_seed(0)
            model = Diffusion(config).to(device)
            for p in model.parameters():
                torch.nn.init.normal_(p, std=0.02)
            x0 = torch.randint(0, args.vocab - 1, (args.batch, args.length), device=device)
            t = torch.full((args.batch,), args.t, device=device)
            kinds = ("full", "masked") if ar else ("plain", "full", "masked")
            if args.with_checkpointing:
                kinds += ("masked_ckpt",)
            if args.padding_baseline:
                kinds += ("masked_unpadded",)
            times = {k: [] for k in kinds}
            peaks = {k: [] for k in kinds}
            for repeat in range(args.warmup + args.repeats):
                for kind in kinds:  # alternated, so drift hits every path alike
                    model.zero_grad(set_to_none=True)
                    generator = torch.Generator(device=device).manual_seed(repeat)
                    start = reset_peak(device)
                    began = time.perf_counter()
                    step_loss(kind, model, x0, t, generator).backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds = time.perf_counter() - began
                    if repeat >= args.warmup:
                        times[kind].append(seconds)
                        peaks[kind].append(peak_since(device, start))
            base = "full" if ar else "plain"
            tokens = args.batch * args.length
            row = {"objective": objective, "model": size, "baseline": base}
            for kind in kinds:
                seconds = statistics.median(times[kind])
                row[kind] = {"tokens_per_s": tokens / seconds, "seconds": seconds,
                             "peak_mib": max(peaks[kind]) / 2**20}
            row["speedup"] = row[base]["seconds"] / row["masked"]["seconds"]
            row["memory_ratio"] = row["masked"]["peak_mib"] / row[base]["peak_mib"]
            if args.padding_baseline:  # what padding the vocabulary gains (CUDA pads)
                row["padding_speedup"] = (row["masked_unpadded"]["seconds"]
                                          / row["masked"]["seconds"])
            if args.with_checkpointing:
                row["checkpointed_speedup"] = row[base]["seconds"] / row["masked_ckpt"]["seconds"]
                row["checkpointed_memory_ratio"] = (row["masked_ckpt"]["peak_mib"]
                                                    / row[base]["peak_mib"])
            if not ar:
                row["speedup_vs_full"] = row["full"]["seconds"] / row["masked"]["seconds"]
                # the most the masked path can gain: the plain loss's training FLOPs over its
                # own, which project the masked share of the positions (the same trunk)
                with torch.no_grad():
                    noised = model.noised(x0, t, torch.Generator(device=device).manual_seed(0))
                share = float((noised.xt == model.mask_index).float().mean())
                row["masked_share"] = share
                row["flop_ceiling"] = (flops_per_token(config)
                                       / flops_per_token(config, output_fraction=share))
            rows.append(row)
            print(f"{objective:>5} {size:>6}: " + "  ".join(
                f"{k} {row[k]['tokens_per_s']:,.0f} tok/s {row[k]['peak_mib']:,.0f} MiB"
                for k in kinds) + f"  -> masked {row['speedup']:.2f}x speed"
                + (f" (FLOP ceiling {row['flop_ceiling']:.2f}x)" if "flop_ceiling" in row else "")
                + f", {row['memory_ratio']:.2f}x memory of {base}", flush=True)
    return {"bench": "train_loss", "device": _device_name(), "batch": args.batch,
            "length": args.length, "vocab": args.vocab, "t": args.t,
            "chunk_rows": args.chunk_rows, "autocast": args.autocast, "results": rows}


# ---------------------------------------------------------------------- engine suite
ENGINE_SIZE = ["data=builtin", "model=tiny", "model.length=64"]


def _mdlm(args_list, env, timeout=1800):
    done = subprocess.run([sys.executable, "-m", *args_list], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(" ".join(args_list) + " failed:\n" + done.stderr[-3000:])
    return done


def mdlm_step_seconds(run_dir: Path, env: dict, steps: int, extra: list[str]) -> float:
    """Median step time of a real ``mdlm mode=train`` run (steps after the first 5)."""
    _mdlm(["pretrain", *ENGINE_SIZE, "loader.global_batch_size=1", "loader.batch_size=1",
           "loader.num_workers=0", "trainer.precision=32", f"trainer.max_steps={steps}",
           "trainer.val_check_interval=0", "checkpointing.every_n_steps=0",
           "checkpointing.resume_from_ckpt=False", "trainer.log_every_n_steps=1000",
           "lr_scheduler.num_warmup_steps=0", f"hydra.run.dir={run_dir}", *extra], env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_seconds"] for r in records[5:])


def plain_loop_seconds(vocab: int, mask_index: int, steps: int) -> float:
    """Median step time of the same model and loss in a plain loop with torch's AdamW."""
    config = ModelConfig(**ARCHITECTURES["tiny"], length=64, vocab_size=vocab,
                         mask_index=mask_index, autocast="off")
    torch.manual_seed(0)
    model = Diffusion(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x0 = torch.randint(0, mask_index, (1, 64))
    seconds = []
    for _ in range(steps):
        began = time.perf_counter()
        model.loss(x0).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds[5:])


def engine_suite(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MDLM_DATA_DIR=str(Path(tmp) / "data"), CUDA_VISIBLE_DEVICES="",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        _mdlm(["pretrain.data.prepare", *ENGINE_SIZE, "shards.num_proc=1",
               f"hydra.run.dir={tmp}/prepare"], env)
        from model import mask_and_vocab
        from pretrain.data.tokenizers import get_tokenizer

        mask_index, vocab = mask_and_vocab(get_tokenizer("builtin", env["MDLM_DATA_DIR"]))
        results = {}
        for repeat in range(args.repeats):  # alternated
            results.setdefault("plain_torch_adamw", []).append(
                plain_loop_seconds(vocab, mask_index, args.engine_steps))
            # the last: without the two things the plain loop does not do, so the gap
            # between it and mdlm is what the EMA and clipping cost
            for name, extra in (("mdlm", []), ("mdlm_compiled", ["model.compile=True"]),
                                ("mdlm_torch_adamw", ["optim.impl=torch"]),
                                ("mdlm_no_ema_no_clip", ["training.ema=0",
                                                         "trainer.gradient_clip_val=0"])):
                results.setdefault(name, []).append(mdlm_step_seconds(
                    Path(tmp) / f"{name}_{repeat}", env, args.engine_steps, extra))
    seconds = {k: statistics.median(v) for k, v in results.items()}
    for name, value in seconds.items():
        print(f"{name:>18}: {value * 1000:7.1f} ms/step  "
              f"({seconds['plain_torch_adamw'] / value:.2f}x the plain loop)", flush=True)
    return {"bench": "train_engine", "device": _device_name(), "model": "tiny", "length": 64,
            "batch": 1, "vocab": vocab, "seconds_per_step": seconds,
            "speedup_vs_plain": seconds["plain_torch_adamw"] / seconds["mdlm"],
            "compiled_speedup_vs_plain": seconds["plain_torch_adamw"] / seconds["mdlm_compiled"],
            "speedup_vs_plain_without_ema_and_clipping":
                seconds["plain_torch_adamw"] / seconds["mdlm_no_ema_no_clip"]}


# ---------------------------------------------------------------------- optimizer suite
def optimizer_suite(args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_optim import run

    return run(params_millions=args.optimizer_params, steps=args.optimizer_steps)


# ---------------------------------------------------------------------- gpu suite
def engine_throughput(size: str, batch: int, args, compiled: bool,
                      precision: str | None = None, profile: bool = False) -> dict:
    """tokens/s, MFU and peak memory of DeepSpeed training steps (masked path) at ``batch``;
    ``precision`` one of ``32``, ``bf16`` (fp32 engine, bf16 autocast: the release's) and
    ``bf16-deepspeed`` (DeepSpeed's bf16 engine)."""
    precision = precision or args.precision
    import deepspeed

    from pretrain import distributed as D

    D.init()
    device = D.device()
    config = ModelConfig(**ARCHITECTURES[size], length=args.length, dropout=0.1,
                         vocab_size=args.vocab, mask_index=args.vocab - 1,
                         autocast="off" if precision == "32" else "bf16",
                         attn_backend=args.attn, compile=compiled,
                         loss_path=args.loss_path)
    torch.manual_seed(0)
    model = Diffusion(config)

    class LossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.loss(x).loss

    module = LossModule()
    ds = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch,
          "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": args.zero}, "steps_per_print": 10**9}
    if precision == "bf16-deepspeed":
        ds["bf16"] = {"enabled": True}
    if device.type == "cuda":  # FusedAdam, built as a training run builds it
        optimizer = deepspeed_adamw(module.parameters(), {"lr": 3e-4}, cpu=False)
    else:
        optimizer = torch.optim.AdamW(module.parameters(), lr=3e-4)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds)
    x = torch.randint(0, config.mask_index, (batch, args.length), device=device)

    def step():
        engine.backward(engine(x))
        engine.step()

    for _ in range(args.warmup):
        step()
    start = reset_peak(device)
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / args.steps
    result = {"model": size, "batch": batch, "compiled": compiled, "precision": precision,
              "seconds_per_step": seconds, "tokens_per_s": batch * args.length / seconds,
              "peak_memory_gib": (peak_since(device, start) + start) / 2**30}
    if profile:
        profile_steps(step, device, f"{size} {precision} compiled={compiled}, "
                                    f"micro-batch {batch}")
    peak = peak_flops()
    if peak:
        # dense count (every position projected), and the FLOPs this path computes: the
        # output layer at the masked half of the positions, on average
        result["mfu"] = result["tokens_per_s"] * flops_per_token(config) / peak
        if args.loss_path == "masked":
            result["mfu_computed"] = (result["tokens_per_s"]
                                      * flops_per_token(config, output_fraction=0.5) / peak)
    return result


def profile_steps(step, device, title: str, steps: int = 3, rows: int = 30) -> None:
    """The kernels (or CPU ops) that take the time of ``steps`` more steps, by self time:
    printed, and kept in ``$OUT/profile.txt`` when ``OUT`` is set (a device session)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    text = f"# profile: {title}, {steps} steps\n{table}"
    print(text, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "profile.txt", "a") as f:
            f.write(text + "\n")


def _release_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(size: str, args, compiled: bool) -> dict:
    """Doubles the micro-batch until a step runs out of memory; the last one that fits."""
    best, batch = None, args.batch
    while batch <= args.max_batch:
        try:
            best = engine_throughput(size, batch, args, compiled)
        except torch.OutOfMemoryError:
            break
        finally:
            _release_memory()
        print(f"  {size} compiled={compiled} batch {batch}: "
              f"{best['tokens_per_s']:,.0f} tokens/s", flush=True)
        batch *= 2
    if best is None:
        raise RuntimeError(f"model={size} does not fit one micro-batch of {args.batch}")
    return best


def _print_run(size: str, r: dict) -> dict:
    mfu = f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""
    if "mfu_computed" in r:
        mfu += f" (of FLOPs computed: {r['mfu_computed']:.1%})"
    print(f"{size:>7} {r['precision']} compiled={r['compiled']}: batch {r['batch']}  "
          f"{r['tokens_per_s']:,.0f} tokens/s{mfu}  peak {r['peak_memory_gib']:.1f} GiB",
          flush=True)
    return r


def gpu_suite(args) -> dict:
    """Uncompiled at the largest micro-batch that fits; compiled (blocks under
    ``torch.compile``) at that same batch, halved if compilation needs more memory."""
    rows = []
    for size in args.models.split(","):
        if args.compile == "only":  # compiled alone, at the largest micro-batch that fits
            best = largest_batch(size, args, compiled=True)
            if args.profile:
                try:
                    engine_throughput(size, best["batch"], args, True, profile=True)
                finally:
                    _release_memory()
            rows.append(_print_run(size, best))
            continue
        plain = largest_batch(size, args, compiled=False)
        runs = [plain]
        if args.compile != "no":
            batch = plain["batch"]
            while batch >= 1:
                try:
                    runs.append(engine_throughput(size, batch, args, compiled=True,
                                                  profile=args.profile))
                    break
                except torch.OutOfMemoryError:
                    batch //= 2
                finally:
                    _release_memory()
        if args.profile and args.compile == "no":  # the eager step's profile instead
            try:
                engine_throughput(size, plain["batch"], args, False, profile=True)
            finally:
                _release_memory()
        for other in filter(None, args.also_precision.split(",")):
            try:  # uncompiled, at the batch found
                runs.append(engine_throughput(size, plain["batch"], args, False, other))
            except torch.OutOfMemoryError:
                print(f"{size:>7} precision={other}: batch {plain['batch']} does not fit",
                      flush=True)
            finally:
                _release_memory()
        rows += [_print_run(size, r) for r in runs]
    return {"bench": "train_step", "device": _device_name(), "precision": args.precision,
            "attn": args.attn, "zero": args.zero, "length": args.length, "vocab": args.vocab,
            "loss_path": args.loss_path, "results": rows}


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="loss", choices=["loss", "engine", "optimizer", "gpu"])
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--objectives", default="subs,ar")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--t", type=float, default=0.5)
    parser.add_argument("--chunk-rows", type=int, default=0)
    parser.add_argument("--autocast", default="off", choices=["off", "bf16"])
    parser.add_argument("--with-checkpointing", action="store_true",
                        help="also the masked path with activation checkpointing per block")
    parser.add_argument("--padding-baseline", action="store_true",
                        help="also the masked path without padding the vocabulary")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--engine-steps", type=int, default=25)
    parser.add_argument("--optimizer-params", type=int, default=100)
    parser.add_argument("--optimizer-steps", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "32",
                        choices=["32", "bf16", "bf16-deepspeed"])
    parser.add_argument("--profile", action="store_true",
                        help="gpu suite: profile the compiled run's steps (top kernels)")
    parser.add_argument("--also-precision", default="",
                        help="gpu suite: these precisions too, uncompiled, at the batch found")
    parser.add_argument("--attn", default="sdpa", choices=["auto", "sdpa", "flash"])
    parser.add_argument("--compile", default="both", choices=["both", "no", "only"],
                        help="gpu suite: eager and compiled, eager only, or compiled only")
    parser.add_argument("--loss-path", default="masked", choices=["masked", "full"])
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    suite = {"loss": loss_suite, "engine": engine_suite, "optimizer": optimizer_suite,
             "gpu": gpu_suite}[args.suite]
    print(json.dumps(suite(args)), flush=True)


if __name__ == "__main__":
    main()
