"""Forward+backward throughput of the DiT (and the causal transformer) at L = 1024.

For each model size and each precision / compile setting, times full training-style steps
(MDLM SUBS loss forward + backward) and reports tokens per second. Prints a readable table,
then one JSON line; ``--out`` also saves the JSON.

    python benchmarks/bench_model.py                       # tiny and small, batch 1
    python benchmarks/bench_model.py --models tiny --steps 5 --batch 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from model import Diffusion, ModelConfig
from model.config import ARCHITECTURES


def bench_one(size: str, precision: str, compiled: bool, args) -> dict:
    device = torch.device(args.device)
    config = ModelConfig(**ARCHITECTURES[size], length=args.length, dropout=0.0,
                         autocast="bf16" if precision == "bf16" else "off",
                         compile=compiled, backbone=args.backbone,
                         parameterization="ar" if args.backbone == "ar" else "subs")
    torch.manual_seed(0)
    model = Diffusion(config).to(device).train()
    x = torch.randint(0, config.mask_index, (args.batch, args.length), device=device)

    def step():
        loss = model.loss(x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        started = time.perf_counter()
        for _ in range(args.warmup):
            step()
        warm_seconds = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / args.steps
    except Exception as err:  # e.g. bf16 or the compiler unsupported on this machine
        return {"model": size, "precision": precision, "compile": compiled,
                "error": f"{type(err).__name__}: {err}"[:200]}
    return {"model": size, "precision": precision, "compile": compiled,
            "seconds_per_step": seconds, "tokens_per_s": args.batch * args.length / seconds,
            "warmup_seconds": warm_seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", default="off,on", help="off, on or off,on")
    parser.add_argument("--backbone", default="dit", choices=["dit", "ar"])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    rows = []
    for size in args.models.split(","):
        for precision in args.precisions.split(","):
            for compiled in [c == "on" for c in args.compile.split(",")]:
                rows.append(bench_one(size, precision, compiled, args))
                r = rows[-1]
                status = (f"{r['tokens_per_s']:>12,.0f} tok/s  {r['seconds_per_step']:.3f} s/step"
                          if "error" not in r else r["error"])
                print(f"{size:>7} {precision:>5} compile={'on ' if compiled else 'off'} {status}",
                      flush=True)
    result = {
        "bench": "model_fwd_bwd", "device": args.device,
        "device_name": (torch.cuda.get_device_name() if args.device == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "length": args.length, "batch": args.batch, "backbone": args.backbone, "results": rows,
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
