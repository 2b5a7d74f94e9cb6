#!/usr/bin/env bash
# From nothing to samples in a few minutes, no network needed: sets up .venv, prepares the
# built-in corpus (CPython's documentation, a 4k BPE), trains a small MDLM with DeepSpeed,
# evaluates its perplexity, samples a few texts with the exact fast sampler and prints them.
# Ranks: 2 on the CPU without a GPU; with GPUs, one rank per GPU for 1, 2, 4 or 8 of them
# (the most that fit, so the global batch of 16 divides); RANKS=n chooses. The launcher
# takes the first GPUs of the machine (it ignores CUDA_VISIBLE_DEVICES next to --num_gpus).
#   bash launch/quickstart.sh   (RUN_DIR=runs/quickstart, STEPS=100, SAMPLE_STEPS=1000 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
BIN=${VENV:-.venv}/bin
RUN=${RUN_DIR:-runs/quickstart}
STEPS=${STEPS:-100}
SAMPLE_STEPS=${SAMPLE_STEPS:-1000}
export MDLM_DATA_DIR=${MDLM_DATA_DIR:-$PWD/data}
SIZE=(data=builtin model=tiny model.n_blocks=4 model.length=128)
GLOBAL_BATCH=16
GPUS=$("$BIN/python" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -eq 0 ]; then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # the ranks stay on the CPU
    DEFAULT_RANKS=2
else
    DEFAULT_RANKS=1
    while [ $((DEFAULT_RANKS * 2)) -le "$GPUS" ] && [ $((DEFAULT_RANKS * 2)) -le 8 ]; do
        DEFAULT_RANKS=$((DEFAULT_RANKS * 2))
    done
fi
RANKS=${RANKS:-$DEFAULT_RANKS}
if [ "$RANKS" -lt 1 ] || [ $((GLOBAL_BATCH % RANKS)) -ne 0 ]; then
    echo "quickstart: RANKS=$RANKS must divide the global batch of $GLOBAL_BATCH; use 1, 2, 4, 8 or 16." >&2
    exit 2
fi
if [ "$GPUS" -gt 0 ] && [ "$RANKS" -gt "$GPUS" ]; then
    echo "quickstart: RANKS=$RANKS but $GPUS GPU(s) visible; use RANKS of at most $GPUS." >&2
    exit 2
fi

echo "== preparing the built-in corpus"
"$BIN/python" -m pretrain.data.prepare "${SIZE[@]}" hydra.run.dir="$RUN/prepare"

echo "== training on $RANKS ranks for $STEPS steps"
"$BIN/deepspeed" --num_gpus "$RANKS" --no_local_rank --module pretrain "${SIZE[@]}" \
    loader.global_batch_size=$GLOBAL_BATCH loader.batch_size=$((GLOBAL_BATCH / RANKS)) \
    loader.eval_batch_size=4 \
    trainer.max_steps="$STEPS" sampling.predictor=ddpm_fast sampling.steps=128 \
    sampling.num_sample_batches=1 \
    optim.lr=1e-3 lr_scheduler.num_warmup_steps=20 trainer.val_check_interval="$STEPS" \
    checkpointing.every_n_steps="$STEPS" trainer.precision=32 trainer.log_every_n_steps=25 \
    hydra.run.dir="$RUN"

echo "== perplexity of the EMA weights on the validation split"
"$BIN/mdlm" mode=ppl_eval eval.checkpoint_path="$RUN" "${SIZE[@]}" loader.eval_batch_size=16 \
    hydra.run.dir="$RUN/eval" | tail -n 1

echo "== samples (ddpm_fast, $SAMPLE_STEPS steps)"
"$BIN/mdlm" mode=sample_eval eval.checkpoint_path="$RUN" "${SIZE[@]}" \
    sampling.predictor=ddpm_fast sampling.steps="$SAMPLE_STEPS" loader.eval_batch_size=4 \
    sampling.num_sample_batches=1 sampling.num_sample_log=4 hydra.run.dir="$RUN/sample_eval"

echo
echo "TensorBoard logs: $RUN/tensorboard   (tensorboard --logdir $RUN/tensorboard)"
echo "checkpoints:      $RUN/checkpoints   (python -m pretrain.export $RUN <dir> for HF weights)"
echo "samples:          $RUN/sample_eval/samples.jsonl (and those of validation in $RUN/samples)"
