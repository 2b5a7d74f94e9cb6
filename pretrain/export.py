"""Writes a checkpoint's consolidated weights in the HF (``kuleshov-group/mdlm-owt``) layout.

    python -m pretrain.export <run dir | checkpoints dir | checkpoint dir | .ckpt> <out dir> [--raw]
        [--trust]

EMA weights by default (``--raw`` for the trained weights); works for every ZeRO stage
without a process group. Pickled files are read without running code from them; ``--trust``
loads every object of a file you trust.
"""

from __future__ import annotations

import argparse
import sys

from model import CheckpointError, load_pretrained, save_pretrained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--raw", action="store_true", help="the trained weights, not the EMA")
    parser.add_argument("--trust", action="store_true",
                        help="load every object pickled in the checkpoint (trusted files only)")
    args = parser.parse_args(argv)
    try:
        model = load_pretrained(args.checkpoint, use_ema=not args.raw, trust=args.trust)
    except CheckpointError as err:
        print(f"export: {err}", file=sys.stderr)
        return 2
    out = save_pretrained(model, args.out_dir)
    print(f"wrote {'raw' if args.raw else 'EMA'} weights of {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
