"""The correctness checks of ``benchmarks/gpu_check.sh`` that need a device, each printing
one JSON line with ``"ok"``. On a CPU (``--dry-run`` sizes) they run the same code paths.

    python benchmarks/gpu_checks.py logits            bf16 against fp32 logits, same weights
    python benchmarks/gpu_checks.py fused-loss        a compiled model's cross entropy = plain
    python benchmarks/gpu_checks.py bd3lm-flex        block diffusion: flex = SDPA, and speed
    python benchmarks/gpu_checks.py crop              text8-crop with a generator on the device
    python benchmarks/gpu_checks.py sampling-memory   validation sampling at release sizes
    python benchmarks/gpu_checks.py syncs             host synchronizations per training step
    python benchmarks/gpu_checks.py same-losses A B   two runs' metrics.jsonl losses agree
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a plain checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import Diffusion, ModelConfig  # noqa: E402
from model.config import ARCHITECTURES  # noqa: E402

GPT2_VOCAB = 50258


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sizes(dry: bool) -> dict:
    """The release's sizes on a device; small ones for a CPU dry run."""
    if dry:
        return dict(arch="tiny", length=64, vocab=4097, batch=4)
    return dict(arch="small", length=1024, vocab=GPT2_VOCAB, batch=64)


def build(dry: bool, **changes) -> Diffusion:
    s = sizes(dry)
    config = ModelConfig(**ARCHITECTURES[s["arch"]], length=s["length"], vocab_size=s["vocab"],
                         mask_index=s["vocab"] - 1, dropout=0.0, **changes)
    torch.manual_seed(0)
    model = Diffusion(config).to(device()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def report(name: str, ok: bool, **values) -> bool:
    print(json.dumps({"check": name, "ok": bool(ok), "device": str(device()), **values}),
          flush=True)
    return ok


def check_logits(dry: bool) -> bool:
    """bf16 autocast (the release's mixed precision) against fp32 on the same weights."""
    full = build(dry, autocast="off")
    mixed = build(dry, autocast="bf16")
    mixed.load_state_dict(full.state_dict())
    s = sizes(dry)
    x = torch.randint(0, s["vocab"] - 1, (4, s["length"]), device=device())
    with torch.no_grad():
        a, b = full.backbone(x), mixed.backbone(x)
    diff = (a - b).abs()
    return report("bf16_vs_fp32_logits", b.dtype == torch.float32 and float(diff.max()) < 0.5
                  and not torch.equal(a, b), max_abs=float(diff.max()),
                  mean_abs=float(diff.mean()), logit_std=float(a.std()))


def check_crop(dry: bool) -> bool:
    """A block twice the model length is cropped at an offset drawn with a generator of
    the model's device (the evaluation passes such generators)."""
    model = build(dry, backbone="ar", parameterization="ar", bos_index=1, eos_index=2)
    s = sizes(dry)
    x0 = torch.randint(3, s["vocab"] - 1, (2, 2 * s["length"]), device=device())
    generator = torch.Generator(device=device()).manual_seed(0)
    with torch.no_grad():
        out = model.loss(x0, generator=generator)
    return report("text8_crop_device_generator", bool(torch.isfinite(out.loss)),
                  loss=float(out.loss))


def check_sampling_memory(dry: bool) -> bool:
    """Two steps of validation sampling (ddpm_cache, float64 Gumbel noise) at the batch the
    release's slurm script gives one GPU, with the peak memory it adds."""
    from sampling.diffusion import sample

    model = build(dry, autocast="bf16" if device().type == "cuda" else "off")
    s = sizes(dry)
    if device().type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    generator = torch.Generator(device=device()).manual_seed(0)
    tokens, nfe = sample(model, s["batch"], s["length"], steps=128, predictor="ddpm_cache",
                         generator=generator, stop_after=2, noise_removal=False)
    values = {"batch": s["batch"], "length": s["length"], "vocab": s["vocab"], "nfe": nfe}
    if device().type == "cuda":
        torch.cuda.synchronize()
        values["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        # one float32 batch x length x vocab tensor, the unit of the sampler's working set
        values["probs_gib"] = s["batch"] * s["length"] * s["vocab"] * 4 / 2**30
    return report("validation_sampling_memory", tokens.shape == (s["batch"], s["length"]),
                  **values)


def check_syncs(dry: bool) -> bool:
    """Host synchronizations in one training micro-step (forward + backward of the masked
    loss): the count of positions to project is the one expected."""
    if device().type != "cuda":
        return report("host_syncs_per_micro_step", True, skipped="needs CUDA")
    model = build(dry, autocast="bf16").train()
    s = sizes(dry)
    x0 = torch.randint(0, s["vocab"] - 1, (8, s["length"]), device=device())
    model.loss(x0).loss.backward()  # warm-up: caches, workspaces
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.loss(x0).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return report("host_syncs_per_micro_step", len(syncs) <= 1, syncs=len(syncs),
                  where=syncs[:5])


def check_fused_loss(dry: bool) -> bool:
    """The training cross entropy as a compiled model scores it (the fused kernel, the
    vocabulary padded, the weight gradient added in float32 by the GEMM) against the plain
    chunked one, on the same weights and noise. In fp32 they agree; under bf16 autocast
    each is compared with the fp32 result, and the fused one must be no further off than
    the release-equivalent full-logits path."""
    from unittest import mock

    import model.projection as projection

    s = sizes(dry)
    x0 = torch.randint(0, s["vocab"] - 1, (4, s["length"]), device=device())

    def run(autocast: str, fused: bool, **changes):
        model = build(dry, autocast=autocast, **changes).train()
        if fused:
            model.backbone.output_layer.linear.compile_loss()
            patches = ()
        else:
            patches = (mock.patch.dict(projection.PAD_VOCAB_TO, clear=True),
                       mock.patch.dict(projection._ADDS_INTO_FLOAT32, {device().type: False}))
        for patch in patches:
            patch.start()
        try:
            out = model.loss(x0, generator=torch.Generator(device=device()).manual_seed(0))
            out.loss.backward()
        finally:
            for patch in patches:
                patch.stop()
        return out.nlls.detach().float(), torch.cat([p.grad.flatten().float()
                                            for p in model.parameters() if p.grad is not None])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    nlls, grads = run("off", False)
    fused_nlls, fused_grads = run("off", True)
    values = {"fp32": {"loss_rel": rel(fused_nlls, nlls), "grad_rel": rel(fused_grads, grads)}}
    ok = values["fp32"]["loss_rel"] <= 1e-5 and values["fp32"]["grad_rel"] <= 1e-4
    # under bf16 autocast, each path's distance from the fp32 result; the fused one (whose
    # logits' gradient is rounded to bf16, as nn.Linear's backward under autocast rounds
    # it) must be no further off than the release-equivalent full-logits path
    bf16 = {"full": run("bf16", False, loss_path="full"), "chunked": run("bf16", False),
            "fused": run("bf16", True)}
    values["bf16_vs_fp32"] = {name: {"loss_rel": rel(n, nlls), "grad_rel": rel(g, grads)}
                              for name, (n, g) in bf16.items()}
    for key in ("loss_rel", "grad_rel"):
        bound = 1.1 * values["bf16_vs_fp32"]["full"][key] + 1e-6
        ok = ok and values["bf16_vs_fp32"]["fused"][key] <= bound
    return report("fused_cross_entropy", ok, **values)


def check_bd3lm_flex(dry: bool) -> bool:
    """Block diffusion's training pass (x_t and x_0 side by side, 2L positions, blocks of
    16; 4 on a CPU) through flex attention (``auto`` on CUDA: compiled, its BlockMask
    skipping empty tiles) against SDPA with the dense mask, under bf16 autocast: each one's
    distance from an fp32 SDPA pass on the same weights, noise and times, where flex must
    be no further off than SDPA; then the forward + backward time of each. On CUDA also
    flex inside compiled blocks with activation checkpointing (training's setup). On a CPU
    flex is not used (no backward there) and both rows run SDPA."""
    import time

    s = sizes(dry)
    block = 4 if dry else 16
    batch = 4 if dry else 16
    x0 = torch.randint(0, s["vocab"] - 1, (batch, s["length"]), device=device())
    state = None

    def run(autocast: str, backend: str, steps: int = 0, compiled: bool = False):
        nonlocal state
        model = build(dry, autocast=autocast, attn_backend=backend, parameterization="bd3lm",
                      block_size=block, resample=False,
                      activation_checkpointing=compiled).train()
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        if compiled:  # as training runs it on CUDA: flex inside each compiled block
            compile_backbone(model.backbone)

        def step():
            model.zero_grad(set_to_none=True)
            out = model.loss(x0, generator=torch.Generator(device=device()).manual_seed(0))
            out.loss.backward()
            return out

        out = step()
        result = (out.nlls.detach().float(), torch.cat(
            [p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
        if not steps:
            return result, None
        if device().type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        if device().type == "cuda":
            torch.cuda.synchronize()
        return result, (time.perf_counter() - started) / steps

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    from model import compile_backbone
    from model.attention import uses_flex

    (nlls, grads), _ = run("off", "sdpa")
    steps = 2 if dry else 10
    values = {"flex_used": uses_flex("auto", device()), "batch": batch,
              "length": s["length"], "block_size": block}
    ok = True
    # the last row, CUDA only (compiling on a CPU takes minutes): compiled blocks with
    # activation checkpointing, as a training run on a GPU has them
    rows = {"sdpa": ("sdpa", False), "auto": ("auto", False)}
    if device().type == "cuda":
        rows["auto_compiled_checkpointed"] = ("auto", True)
    for name, (backend, compiled) in rows.items():
        (n, g), seconds = run("bf16", backend, steps, compiled)
        values[name] = {"loss_rel": rel(n, nlls), "grad_rel": rel(g, grads),
                        "ms_per_step": 1e3 * seconds,
                        "tokens_per_s": batch * s["length"] / seconds}
    for name in rows:
        for key in ("loss_rel", "grad_rel"):
            ok = ok and values[name][key] <= 1.1 * values["sdpa"][key] + 1e-4
    values["speedup"] = values["sdpa"]["ms_per_step"] / values["auto"]["ms_per_step"]
    return report("bd3lm_flex_vs_sdpa", ok, **values)


def check_same_losses(a: str, b: str, rtol: float) -> bool:
    """The losses of two runs' metrics.jsonl agree step for step (a resumed run against an
    uninterrupted one): within 1e-6 on the CPU, within ``rtol`` on CUDA, whose reductions
    are not deterministic. (Two uninterrupted one-rank CPU runs were seen to differ by
    5e-7 at a step, so the CPU bound is not 0; the 2-rank resume test is bitwise.)"""
    def losses(run):
        lines = Path(run, "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    la, lb = losses(a), losses(b)
    worst = max((abs(la[k] - lb[k]) / max(abs(la[k]), 1e-12) for k in la), default=float("inf"))
    tolerance = 1e-6 if device().type == "cpu" else rtol
    return report("resume_same_losses", sorted(la) == sorted(lb) and worst <= tolerance,
                  steps=len(la), max_rel_diff=worst, tolerance=tolerance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["logits", "fused-loss", "bd3lm-flex", "crop",
                                          "sampling-memory", "syncs", "same-losses"])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--rtol", type=float, default=2e-3)
    args = parser.parse_args()
    if args.check == "same-losses":
        ok = check_same_losses(*args.runs, rtol=args.rtol)
    else:
        ok = {"logits": check_logits, "fused-loss": check_fused_loss,
              "bd3lm-flex": check_bd3lm_flex, "crop": check_crop,
              "sampling-memory": check_sampling_memory, "syncs": check_syncs}[args.check](
            args.dry_run or device().type == "cpu")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
