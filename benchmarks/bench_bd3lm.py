"""Block diffusion against its neighbours, and its sampler's KV cache, each as one JSON line.

- ``--suite nll``: AR, BD3-LM at block sizes 4 and 16, and MDLM trained from scratch on
  the built-in corpus with the same network size, steps, batch and learning rate (no EMA:
  the runs are short), then ``mode=ppl_eval`` of each final checkpoint (AR exact; the
  diffusion bounds averaged over ``--mc`` passes, with their standard error). The BD3-LM
  release's ordering on LM1B and OpenWebText is AR < BD3-LM(4) < BD3-LM(16) < MDLM.
- ``--suite sampling``: seconds per sample and network calls of block diffusion at
  ``--length`` tokens (past the model's 1024-token context), with the KV cache and with the
  prefix recomputed at every call, on the same weights and noise.

    python benchmarks/bench_bd3lm.py --suite nll --steps 300
    python benchmarks/bench_bd3lm.py --suite sampling --length 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {  # name -> overrides
    "ar": ["model=tiny-ar", "backbone=ar", "parameterization=ar"],
    "bd3lm_4": ["model=tiny", "parameterization=bd3lm", "block_size=4"],
    "bd3lm_16": ["model=tiny", "parameterization=bd3lm", "block_size=16"],
    "mdlm": ["model=tiny", "parameterization=subs"],
}


def _mdlm(args: list[str], env: dict) -> None:
    done = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(" ".join(args) + " failed:\n" + done.stderr[-3000:])


def nll_suite(args) -> dict:
    size = [f"model.length={args.length}", f"model.hidden_size={args.hidden}",
            f"model.n_blocks={args.blocks}", f"model.n_heads={args.heads}", "model.dropout=0.0"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MDLM_DATA_DIR=str(Path(tmp) / "data"), CUDA_VISIBLE_DEVICES="",
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        common = ["data=builtin", *size, "loader.num_workers=0", "trainer.precision=32",
                  f"loader.global_batch_size={args.batch}", f"loader.batch_size={args.batch}",
                  f"loader.eval_batch_size={args.batch}"]
        for name, overrides in MODELS.items():
            run = Path(tmp) / name
            began = time.perf_counter()
            _mdlm([*common, *overrides, f"trainer.max_steps={args.steps}", "training.ema=0",
                   f"optim.lr={args.lr}", "lr_scheduler.num_warmup_steps=20",
                   "trainer.val_check_interval=0", "eval.generate_samples=False",
                   "checkpointing.every_n_steps=0", f"hydra.run.dir={run}"], env)
            trained = time.perf_counter() - began
            out = run / "ppl_eval.json"
            _mdlm([*common, *overrides, "mode=ppl_eval", f"eval.checkpoint_path={run}",
                   f"eval.num_mc_samples={1 if name == 'ar' else args.mc}",
                   f"eval.output_path={out}", f"hydra.run.dir={run}/eval"], env)
            result = json.loads(out.read_text())
            results[name] = {"nll": result["nll"], "ppl": result["ppl"],
                             "stderr": result["stderr"], "tokens": result["tokens"],
                             "train_seconds": trained}
            print(f"{name:>9}: val NLL {result['nll']:.4f} +- {result['stderr']:.4f} "
                  f"(ppl {result['ppl']:.1f}; trained in {trained:.0f} s)", flush=True)
    order = sorted(results, key=lambda k: results[k]["nll"])
    return {"bench": "bd3lm_nll", "corpus": "builtin", "length": args.length,
            "hidden_size": args.hidden, "n_blocks": args.blocks, "steps": args.steps,
            "batch": args.batch, "lr": args.lr, "mc_passes": args.mc, "results": results,
            "order": order, "release_order": ["ar", "bd3lm_4", "bd3lm_16", "mdlm"]}


def sampling_suite(args) -> dict:
    import torch

    from model import Diffusion, ModelConfig
    from sampling.blocks import block_sample

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=args.vocab, mask_index=args.vocab - 1, length=1024,
                         hidden_size=args.hidden, cond_dim=64, n_blocks=args.blocks,
                         n_heads=args.heads, dropout=0.0, parameterization="bd3lm",
                         block_size=args.block_size,
                         autocast="bf16" if device.type == "cuda" else "off")
    model = Diffusion(config).to(device).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    results, drawn = {}, {}
    for cached in (True, False):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        tokens, _, nfe = block_sample(model, 1, args.length, predictor=args.predictor,
                                      steps=args.block_size, kv_cache=cached,
                                      generator=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        name = "kv_cache" if cached else "recomputed"
        drawn[name] = tokens
        results[name] = {"seconds_per_sample": time.perf_counter() - began, "nfe": nfe,
                         "tokens": tokens.shape[1]}
    speedup = (results["recomputed"]["seconds_per_sample"]
               / results["kv_cache"]["seconds_per_sample"])
    for name, r in results.items():
        print(f"{name:>10}: {r['seconds_per_sample']:.1f} s per sample, NFE {r['nfe']}",
              flush=True)
    # bf16 on a GPU: the two can part where a near-tie rounds differently, so say how often
    same = (drawn["kv_cache"] == drawn["recomputed"]).float().mean().item() if (
        drawn["kv_cache"].shape == drawn["recomputed"].shape) else 0.0
    return {"bench": "bd3lm_sampling", "device": str(device), "length": args.length,
            "context": 1024, "block_size": args.block_size, "predictor": args.predictor,
            "hidden_size": args.hidden, "n_blocks": args.blocks, "results": results,
            "cache_speedup": speedup, "same_tokens": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="nll", choices=["nll", "sampling"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=None,
                        help="nll: model.length (128); sampling: tokens sampled (2048)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4097, help="sampling: vocabulary size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mc", type=int, default=8, help="nll: passes of the bounds")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--predictor", default="first_hitting",
                        choices=["first_hitting", "ddpm_cache"])
    args = parser.parse_args()
    if args.length is None:
        args.length = 128 if args.suite == "nll" else 2048
    suite = nll_suite if args.suite == "nll" else sampling_suite
    print(json.dumps(suite(args)), flush=True)


if __name__ == "__main__":
    main()
