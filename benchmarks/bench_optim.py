"""Optimizer step time on the CPU: torch's AdamW against DeepSpeed's DeepSpeedCPUAdam.

Both step the same fp32 parameters (a few large tensors, ``params_millions`` million in
all, gradients set), in one process, alternating step by step so that both see the same
machine state. Prints a table and one JSON line (``--out`` also saves it); ``run``
returns the same numbers (``benchmarks/bench_train.py`` imports it).

    python benchmarks/bench_optim.py [--params-millions 100] [--steps 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _params(millions: float, pieces: int = 4) -> list[torch.nn.Parameter]:
    size = int(millions * 1e6) // pieces
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(pieces):
        p = torch.nn.Parameter(torch.randn(size, generator=generator))
        p.grad = torch.randn(size, generator=generator) * 1e-3
        params.append(p)
    return params


def _optimizers(params_millions: float) -> dict:
    from omegaconf import OmegaConf

    from pretrain import optim

    cfg = OmegaConf.create({"optim": {"lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                                      "weight_decay": 0.01}})
    built = {}
    for name, impl in (("torch AdamW", "torch"), ("DeepSpeedCPUAdam", "deepspeed")):
        cfg.optim.impl = impl
        module = torch.nn.ParameterList(_params(params_millions))
        built[name] = optim.build(module, cfg, {})
    return built


def run(params_millions: float = 100, steps: int = 5) -> dict:
    """Median seconds per optimizer step of each implementation and their ratio."""
    torch.set_grad_enabled(False)
    optimizers = _optimizers(params_millions)
    for optimizer in optimizers.values():
        optimizer.step()  # state allocation and first touch, not timed
    times = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            started = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"bench": "optimizer_step_cpu", "torch": torch.__version__,
            "params_millions": params_millions, "steps": steps,
            "threads": torch.get_num_threads(),
            "torch_adamw_s": median["torch AdamW"],
            "deepspeed_cpu_adam_s": median["DeepSpeedCPUAdam"],
            "speedup": median["torch AdamW"] / median["DeepSpeedCPUAdam"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-millions", type=float, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON line to this file")
    args = parser.parse_args()
    result = run(args.params_millions, args.steps)
    print(f"optimizer step, {result['params_millions']:g}M fp32 parameters, "
          f"{result['threads']} threads, median of {result['steps']}")
    print(f"{'implementation':<20}{'s/step':>10}")
    print(f"{'torch AdamW':<20}{result['torch_adamw_s']:>10.3f}")
    print(f"{'DeepSpeedCPUAdam':<20}{result['deepspeed_cpu_adam_s']:>10.3f}")
    print(f"{'speedup':<20}{result['speedup']:>9.1f}x")
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
