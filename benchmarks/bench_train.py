"""Training-step throughput through the real DeepSpeed engine (one rank).

For MDLM tiny and small at L = 1024: seconds per optimizer step and tokens/s per device;
on GPU also model FLOPs utilisation (6 N tokens + attention, against the device's bf16
peak) and peak memory. Prints a table and one JSON line.

    python benchmarks/bench_train.py --models tiny,small --batch 1 --steps 3
    python benchmarks/bench_train.py --precision bf16 --batch 8 --attn flash     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from model import Diffusion, ModelConfig
from model.config import ARCHITECTURES
from pretrain.flops import flops_per_token, peak_flops


def bench(size: str, args) -> dict:
    import deepspeed

    from pretrain import distributed as D

    D.init()
    device = D.device()
    config = ModelConfig(**ARCHITECTURES[size], length=args.length, dropout=0.1,
                         autocast="bf16" if args.precision == "bf16" else "off",
                         attn_backend=args.attn, compile=args.compile)
    torch.manual_seed(0)
    model = Diffusion(config)

    class LossModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.loss(x).loss

    module = LossModule()
    ds = {"train_batch_size": args.batch, "train_micro_batch_size_per_gpu": args.batch,
          "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": args.zero}, "steps_per_print": 10**9}
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-4)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds)
    x = torch.randint(0, config.mask_index, (args.batch, args.length), device=device)

    def step():
        loss = engine(x)
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.steps
    tokens_per_s = args.batch * args.length / seconds
    result = {"model": size, "seconds_per_step": seconds, "tokens_per_s_per_device": tokens_per_s,
              "params": sum(p.numel() for p in model.parameters())}
    peak = peak_flops()
    if peak:
        result["mfu"] = tokens_per_s * flops_per_token(config) / peak
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "32")
    parser.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flash"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    for size in args.models.split(","):
        rows.append(bench(size, args))
        r = rows[-1]
        extra = (f"  MFU {r['mfu']:.1%}  peak {r['peak_memory_gib']:.1f} GiB"
                 if "mfu" in r else "")
        print(f"{size:>7}: {r['seconds_per_step']:.3f} s/step  "
              f"{r['tokens_per_s_per_device']:,.0f} tokens/s/device{extra}", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"bench": "train_step", "device": device, "precision": args.precision,
                      "attn": args.attn, "zero": args.zero, "batch": args.batch,
                      "length": args.length, "compile": args.compile, "results": rows}))


if __name__ == "__main__":
    main()
