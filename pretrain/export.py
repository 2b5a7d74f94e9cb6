"""Writes a checkpoint's consolidated weights in the HF (``kuleshov-group/mdlm-owt``) layout.

    python -m pretrain.export <run dir | checkpoints dir | checkpoint dir | .ckpt> <out dir> [--raw]
        [--trust] [--push-to-hub <repo id> [--private]]

EMA weights by default (``--raw`` for the trained weights); works for every ZeRO stage
without a process group. Pickled files are read without running code from them; ``--trust``
loads every object of a file you trust.

The directory holds config.json, model.safetensors and the configuration and modeling code
that ``trust_remote_code=True`` imports, so it opens with transformers alone:
``AutoModelForMaskedLM.from_pretrained(<out dir>, trust_remote_code=True)`` (and
``AutoModelForCausalLM`` for the autoregressive baseline). ``--push-to-hub`` then uploads
it with ``huggingface_hub`` (log in first: ``hf auth login`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model import CheckpointError, load_pretrained, save_pretrained


def push_to_hub(directory: Path, repo_id: str, private: bool = False) -> str:
    """Creates ``repo_id`` on the Hugging Face hub (if it does not exist) and uploads
    ``directory`` to it as one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model",
                               commit_message="Upload an MDLM checkpoint exported by "
                                              "pretrain.export")
    return str(getattr(commit, "commit_url", commit))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--raw", action="store_true", help="the trained weights, not the EMA")
    parser.add_argument("--trust", action="store_true",
                        help="load every object pickled in the checkpoint (trusted files only)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID",
                        help="then upload the directory to this Hugging Face hub model "
                             "repository (created if missing) with huggingface_hub; needs "
                             "the network and a login (hf auth login or HF_TOKEN). The "
                             "project's tests do not exercise the upload itself: they run "
                             "offline")
    parser.add_argument("--private", action="store_true",
                        help="with --push-to-hub: create the repository as private")
    args = parser.parse_args(argv)
    try:
        model = load_pretrained(args.checkpoint, use_ema=not args.raw, trust=args.trust)
    except CheckpointError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    if model.parameterization == "bd3lm":
        print("export: the mdlm-owt layout's modeling code has no block diffusion; use the "
              "bd3lm checkpoint as it is (load_pretrained, or eval.checkpoint_path=...).",
              file=sys.stderr)
        return 2
    out = save_pretrained(model, args.out_dir)
    print(f"wrote {'raw' if args.raw else 'EMA'} weights of {args.checkpoint} to {out}")
    if args.push_to_hub:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            url = push_to_hub(out, args.push_to_hub, args.private)
        except (HfHubHTTPError, OSError, ValueError) as err:  # login, name, network
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            print(f"export: could not upload {out} to {args.push_to_hub!r} "
                  f"({type(err).__name__}{': ' + detail if detail else ''}); check your "
                  "login (hf auth login or HF_TOKEN), the repository name and the network, "
                  "then run the export again.", file=sys.stderr)
            return 2
        print(f"uploaded {out} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
