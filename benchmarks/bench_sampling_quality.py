"""Quality against speed of every predictor: gen-ppl, entropy, MAUVE, NFE and seconds per
sample, at T in {32, 128, 1024}, 32 samples per row.

Setup: the model ``bash launch/quickstart.sh`` trains (``runs/quickstart``: a 4-block tiny
MDLM, L = 128, on the built-in corpus), and a local judge: a small GPT-2 trained here on the
same corpus's train split with the same tokenizer (no network), kept beside the checkpoint
and reused. The judge is also MAUVE's featurizer; MAUVE compares each row's samples with as
many validation-split texts (as many as it has). A "data" row scores the train split's
last 32 blocks, which the judge never saw, the same way.

Rows are written to the results file as they finish, so an interrupted run keeps them.
Prints a table and one JSON line; writes the JSON and a PNG of gen-ppl against NFE (one
line per predictor, each point labelled with its entropy).

    bash launch/quickstart.sh
    python benchmarks/bench_sampling.py --suite quality --checkpoint runs/quickstart
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["data=builtin", "model=tiny", "model.n_blocks=4", "model.length=128"]


def quickstart_config(checkpoint: str):
    from hydra import compose, initialize_config_module

    import pretrain.cli  # noqa: F401  (registers the config's resolvers)

    os.environ.setdefault("MDLM_DATA_DIR", str(ROOT / "data"))
    with initialize_config_module(config_module="pretrain.config", version_base=None):
        return compose(config_name="config", overrides=QUICKSTART + [
            f"eval.checkpoint_path={checkpoint}", "loader.num_workers=0"])


def train_judge(cfg, tokenizer, out: Path, steps: int, device) -> Path:
    """A 2-block GPT-2 (width 128) trained on the train split but its last HELD_OUT blocks:
    next-token loss on blocks of model.length tokens, batch 16, AdamW. Saved with the
    tokenizer, like a hub judge."""
    if (out / "config.json").exists():
        return out
    from transformers import GPT2Config, GPT2LMHeadModel

    from pretrain.data.datasets import open_split

    data = open_split(cfg, "train", tokenizer, progress=False)
    length = int(cfg.model.length)
    torch.manual_seed(0)
    judge = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=length, n_embd=128, n_layer=2, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        index = torch.randint(0, len(data) - HELD_OUT, (16,), generator=g).tolist()
        ids = torch.stack([data[i]["input_ids"] for i in index]).to(device)
        loss = judge(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"judge step {step}: loss {loss.item():.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    judge.cpu().save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


HELD_OUT = 32  # the train split's last blocks: the "data" row, never shown to the judge


def held_out_texts(cfg, tokenizer) -> list[str]:
    from pretrain.data.datasets import open_split
    from pretrain.sample import decode

    data = open_split(cfg, "train", tokenizer, progress=False)
    rows = range(len(data) - HELD_OUT, len(data))
    return decode(tokenizer, [data[i]["input_ids"].tolist() for i in rows])


def score(texts, token_ids, references, judge, args) -> dict:
    from evaluation import generative_perplexity, mauve_score, unigram_entropy

    model, tokenizer = judge
    gen = generative_perplexity(texts, model, tokenizer, max_length=args.length,
                                batch_size=8)
    result = {"gen_ppl": gen["gen_ppl"], "entropy": unigram_entropy(token_ids)}
    result["mauve"] = mauve_score(texts, references, args.judge_dir,
                                  max_length=args.length)["mauve"]
    return result


def row(model, tokenizer, predictor, steps, references, judge, args) -> dict:
    from pretrain.sample import decode
    from sampling import sample

    g = torch.Generator(device=args.device).manual_seed(0)
    t0 = time.perf_counter()
    tokens, nfe = sample(model, args.samples, args.length, predictor=predictor, steps=steps,
                         generator=g)
    seconds = (time.perf_counter() - t0) / args.samples
    ids = tokens.tolist()
    return {"predictor": predictor, "steps": steps, "nfe": nfe,
            "seconds_per_sample": seconds,
            **score(decode(tokenizer, ids), ids, references, judge, args)}


def plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # thirteen predictors, distinct colours
    for name in dict.fromkeys(r["predictor"] for r in rows if r["predictor"] != "data"):
        points = sorted((r for r in rows if r["predictor"] == name), key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in points], [r["gen_ppl"] for r in points], marker="o",
                label=name)
        for r in points:
            ax.annotate(f"{r['entropy']:.2f}", (r["nfe"], r["gen_ppl"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    data = [r for r in rows if r["predictor"] == "data"]
    if data:
        ax.axhline(data[0]["gen_ppl"], color="gray", linestyle="--",
                   label=f"held-out train blocks (entropy {data[0]['entropy']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network calls (NFE)")
    ax.set_ylabel("gen-ppl under the local judge")
    ax.set_title("quickstart MDLM, 32 samples per point; labels: unigram entropy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    from sampling import PREDICTORS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--judge", default=None,
                        help="an HF causal LM directory (default: train one beside the "
                             "checkpoint)")
    parser.add_argument("--judge-steps", type=int, default=600)
    parser.add_argument("--steps", default="32,128,1024")
    parser.add_argument("--predictors", default=",".join(sorted(PREDICTORS)))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/"
                        "results/bench_sampling_quality_<device>.json)")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows already in the results file (a table run in parts)")
    args = parser.parse_args()

    from evaluation import load_judge
    from pretrain.data.datasets import tokenizer_for
    from pretrain.evaluate import load_model
    from pretrain.sample import reference_texts

    if not Path(args.checkpoint).exists():
        raise SystemExit(f"{args.checkpoint} does not exist; run bash launch/quickstart.sh "
                         "first, or pass --checkpoint.")
    device = torch.device(args.device)
    cfg = quickstart_config(args.checkpoint)
    tokenizer = tokenizer_for(cfg)
    model = load_model(cfg, tokenizer, device)
    args.length = int(cfg.model.length)
    args.judge_dir = str(args.judge or train_judge(
        cfg, tokenizer, Path(args.checkpoint) / "judge", args.judge_steps, device))
    judge_model, judge_tokenizer = load_judge(args.judge_dir, device)
    judge = (judge_model, judge_tokenizer)
    references = reference_texts(cfg, tokenizer, args.samples)
    if len(references) < args.samples:
        print(f"the validation split has {len(references)} texts: MAUVE compares each row's "
              f"{args.samples} samples with those {len(references)}")
    held_out = held_out_texts(cfg, tokenizer)  # the "data" row
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"bench_sampling_quality_{device.type}.json")
    rows = json.loads(out.read_text())["rows"] if args.append and out.exists() else []

    def save():
        result = {"bench": "sampling_quality", "device": device.type,
                  "checkpoint": str(args.checkpoint), "judge": args.judge_dir,
                  "samples": args.samples, "length": args.length, "rows": rows}
        out.write_text(json.dumps(result) + "\n")
        return result

    if not rows:
        held_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in held_out]
        rows.append({"predictor": "data", "steps": 0, "nfe": 0, "seconds_per_sample": 0.0,
                     **score(held_out, held_ids, references, judge, args)})
    print(f"{'predictor':<14} {'T':>5} {'gen-ppl':>8} {'entropy':>8} {'MAUVE':>6} "
          f"{'NFE':>5} {'s/sample':>9}")
    print(f"{'data':<14} {'':>5} {rows[0]['gen_ppl']:>8.1f} {rows[0]['entropy']:>8.3f} "
          f"{rows[0]['mauve']:>6.3f}", flush=True)
    for steps in [int(t) for t in args.steps.split(",")]:
        for predictor in args.predictors.split(","):
            earlier = [r for r in rows if r["predictor"] == predictor == "first_hitting"]
            if earlier:  # its law and its draws do not depend on T: the same row
                r = earlier[0] | {"steps": steps, "same_as_steps": earlier[0]["steps"]}
            else:
                r = row(model, tokenizer, predictor, steps, references, judge, args)
            rows[:] = [x for x in rows if (x["predictor"], x["steps"]) != (predictor, steps)]
            rows.append(r)
            save()
            print(f"{predictor:<14} {steps:>5} {r['gen_ppl']:>8.1f} {r['entropy']:>8.3f} "
                  f"{r['mauve']:>6.3f} {r['nfe']:>5} {r['seconds_per_sample']:>9.3f}",
                  flush=True)
    result = save()
    plot(rows, out.with_suffix(".png"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
