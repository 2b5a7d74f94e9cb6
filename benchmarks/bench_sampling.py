"""Seconds per sample of the samplers, in the shape of the release's sampling-speed table
(``--suite speed``, the default), and a quality-speed table of every predictor
(``--suite quality``, in ``bench_sampling_quality.py``).

SEDD + analytic, MDLM + ddpm, MDLM + ddpm_cache and MDLM + ddpm_fast at T steps (5k and 10k
by default), L = 1024, batch 1, GPT-2's vocabulary (50,258), a small network (on CPU a
2-block DiT of width 128 by default, so that the vocabulary x length work of the samplers is
what the table compares). A sampler whose full run would exceed --budget seconds is timed
over the first --probe-steps steps of its schedule and extrapolated linearly (marked
"extrapolated"; every step of ddpm, analytic and ddpm_cache has the same expected cost: the
chance that a step unmasks something is 1 - (1 - dt/t)^(L t), about 1 - exp(-L dt), at
every t). Also times one forward pass, so the fast sampler can be
compared with NFE x forward. Prints a table and one JSON line with the ratios.

    python benchmarks/bench_sampling.py --steps 5000,10000 --budget 120
    python benchmarks/bench_sampling.py --suite quality --checkpoint runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from model import Diffusion, ModelConfig
from sampling import sample


def build(parameterization: str, args) -> Diffusion:
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=args.hidden, n_blocks=args.blocks, n_heads=args.heads,
                         cond_dim=64, length=args.length, dropout=0.0,
                         parameterization=parameterization,
                         time_conditioning=parameterization == "sedd")
    model = Diffusion(config).to(args.device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def timed(model, predictor: str, steps: int, args) -> dict:
    """Seconds per sample (batch 1) and NFE; partial runs are extrapolated."""
    g = torch.Generator(device=args.device).manual_seed(0)

    def run(n):
        """The first n steps of the T-step schedule."""
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, nfe = sample(model, 1, args.length, steps=steps, predictor=predictor, generator=g,
                        noise_removal=False, stop_after=None if n == steps else n)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, nfe

    probe_steps = min(steps, args.probe_steps)
    full = predictor == "ddpm_fast" or probe_steps == steps
    if not full:
        seconds, nfe = run(probe_steps)
        full = seconds * steps / probe_steps <= args.budget
    if full:
        seconds, nfe = run(steps)
        return {"predictor": predictor, "steps": steps, "seconds": seconds, "nfe": nfe,
                "extrapolated": False}
    scale = steps / probe_steps
    return {"predictor": predictor, "steps": steps, "seconds": seconds * scale,
            "nfe": round(nfe * scale), "extrapolated": True, "timed_steps": probe_steps}


@torch.no_grad()
def forward_seconds(model, args, repeats: int = 5) -> float:
    x = torch.full((1, args.length), model.mask_index, device=args.device)
    model(x, torch.zeros(1, device=args.device))
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(x, torch.zeros(1, device=args.device))
    if args.device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main():
    if "--suite" in sys.argv and sys.argv[sys.argv.index("--suite") + 1] == "quality":
        from bench_sampling_quality import main as quality

        sys.argv.pop(sys.argv.index("--suite") + 1)
        sys.argv.remove("--suite")
        return quality()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["speed", "quality"], default="speed")
    parser.add_argument("--steps", default="5000,10000")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds a full run may take before it is extrapolated")
    parser.add_argument("--probe-steps", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    mdlm, sedd = build("subs", args), build("sedd", args)
    forward = forward_seconds(mdlm, args)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        for name, model, predictor in (("SEDD", sedd, "analytic"), ("MDLM", mdlm, "ddpm"),
                                       ("MDLM", mdlm, "ddpm_cache"),
                                       ("MDLM", mdlm, "ddpm_fast")):
            r = timed(model, predictor, steps, args) | {"model": name}
            rows.append(r)
            print(f"T={steps:>6} {name} + {predictor:<10} {r['seconds']:>9.1f} s/sample  "
                  f"NFE {r['nfe']:>6}{'  (extrapolated)' if r['extrapolated'] else ''}",
                  flush=True)
    ratios = {}
    for steps in {r["steps"] for r in rows}:
        by = {r["predictor"]: r for r in rows if r["steps"] == steps}
        fast = by["ddpm_fast"]
        ratios[str(steps)] = {
            "ddpm_over_fast": by["ddpm"]["seconds"] / fast["seconds"],
            "ddpm_cache_over_fast": by["ddpm_cache"]["seconds"] / fast["seconds"],
            "analytic_over_fast": by["analytic"]["seconds"] / fast["seconds"],
            "fast_over_nfe_x_forward": fast["seconds"] / (fast["nfe"] * forward),
        }
    print(json.dumps({"bench": "sampling", "device": args.device, "length": args.length,
                      "hidden": args.hidden, "blocks": args.blocks, "vocab": 50258,
                      "forward_seconds": forward, "results": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
