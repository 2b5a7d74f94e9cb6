#!/usr/bin/env bash
# Every GPU check in one call of well under 8 minutes, for a machine with one CUDA GPU and no
# network. Run from a checkout (the project need not be installed):
#
#   bash benchmarks/gpu_wheels.sh          # here, with network: wheels of what the GPU image
#                                          # lacks (deepspeed, hydra, ...) into .whl/
#   bash benchmarks/gpu_check.sh           # there, with .whl/ carried along
#   bash benchmarks/gpu_check.sh --dry-run # the same steps at toy sizes on a CPU (CI runs it)
#
# Prints, as JSON lines (also appended to $OUT/gpu_check.jsonl, or /tmp/gpu_check.jsonl):
#   1. tokens/s, MFU and peak memory of MDLM small at L=1024 in bf16 (SDPA) through the
#      DeepSpeed engine, compiled and not, at the largest micro-batch that fits; DeepSpeed's
#      bf16 engine (trainer.precision=bf16-deepspeed) at that batch too;
#   2. the masked-only loss path against the full-logits path (speed, peak memory), SUBS and
#      AR, and the masked path with activation checkpointing;
#   3. bf16 against fp32 logits on the same weights; the compiled model's fused cross
#      entropy (padded vocabulary, float32 weight gradient from the GEMM) against the plain
#      chunked one;
#   4. a one-GPU training run that is killed, resumes, and logs the losses of an
#      uninterrupted run (within a tolerance: CUDA reductions are not deterministic);
#   5. host synchronizations per step; text8-crop with a generator on the device;
#      validation sampling at the release's per-GPU batch (64 x 1024 x 50258) with its
#      peak memory;
#   6. fp16 training (loss-scaled) for a few steps;
#   7. block diffusion's training pass through flex attention against SDPA with the dense
#      mask (bf16 against fp32, the time of each; also compiled with activation
#      checkpointing), and its sampler at 2048 tokens with the KV cache and without.
# The whole output goes to $OUT/gpu_check.log. Steps run in that order within a budget
# (GPU_CHECK_BUDGET, 480 s); a step it no longer covers is skipped and counted as failed.
# Exits non-zero when a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PY:-python3}
LOG=${OUT:-/tmp}/gpu_check.jsonl
FULL_LOG=${OUT:-/tmp}/gpu_check.log  # every step's whole output
WORK=$(mktemp -d)
: > "$LOG"
: > "$FULL_LOG"
failed=0
# the whole script's budget in seconds: a step gets what is left of it (or its own limit,
# if smaller) and is skipped, counted as failed, when under 15 s are left
BUDGET=${GPU_CHECK_BUDGET:-480}
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: GPU_CHECK_BUDGET=$BUDGET is not a number of seconds"; exit 2; }
STARTED=$SECONDS
left() { echo $(( BUDGET - (SECONDS - STARTED) )); }
limit_of() { local l; l=$(left); [ "$1" -lt "$l" ] && l=$1; echo "$l"; }

# what the image lacks, from the wheels in .whl/ (pure Python, or built for its Python)
if [ -d .whl ] && ! "$PY" -c "import deepspeed, hydra, omegaconf" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl || { echo "gpu_check: installing .whl/ failed"; exit 1; }
    export PYTHONPATH="$WORK/site"
fi
# the project from this checkout, installed or not
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 REPO
export MDLM_DATA_DIR="$WORK/data"
if ! "$PY" - <<'PY'
import os, model, pretrain
here = os.path.realpath(os.environ["REPO"])
for package in (model, pretrain):
    assert os.path.realpath(package.__file__).startswith(here + os.sep), package.__file__
import deepspeed, hydra, omegaconf  # noqa: F401
PY
then
    echo "gpu_check: the project or its dependencies do not import from $REPO"; exit 1
fi

# GPU_CHECK_STEPS="fused-loss train-straight ...": only these steps (default: all); the
# training steps need prepare, train-resume needs train-killed, same-losses both runs
STEPS=" ${GPU_CHECK_STEPS:-all} "
wanted() { [ "$STEPS" = " all " ] || [[ "$STEPS" == *" $1 "* ]]; }

step() {  # step <name> <seconds> <command...>: runs, keeps JSON lines, records a failure
    wanted "$1" || return 0
    local name=$1 limit; limit=$(limit_of "$2"); shift 2
    echo "== $name ($(( SECONDS - STARTED )) s in, limit ${limit} s)"
    if [ "$limit" -lt 15 ]; then
        echo "gpu_check: step '$name' skipped: the budget of $BUDGET s is spent"; failed=1
        return
    fi
    timeout -k 10 "$limit" "$@" > "$WORK/step.out" 2>&1
    local rc=$?
    { echo "== $name (exit $rc)"; cat "$WORK/step.out"; } >> "$FULL_LOG"
    grep -v -i -E "warn|^\[20" "$WORK/step.out" | tail -n 12
    grep '^{' "$WORK/step.out" >> "$LOG"
    if [ "$rc" -ne 0 ]; then
        echo "gpu_check: step '$name' failed (exit $rc)"; tail -n 25 "$WORK/step.out"
        failed=1
    fi
}

if [ "$DRY" = 1 ]; then
    THROUGHPUT=(--models tiny --length 64 --vocab 4097 --batch 1 --max-batch 2 --steps 1
                --warmup 1 --compile no --precision 32 --also-precision bf16-deepspeed --profile)
    LOSS=(--models tiny --length 64 --vocab 4097 --batch 1 --repeats 1 --warmup 0)
    CHECK=(--dry-run)
    SIZE=(data=builtin model=tiny model.n_blocks=2 model.length=64 trainer.precision=32)
    BD3_SAMPLING=(--hidden 64 --blocks 2 --heads 2 --length 96 --block-size 16)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    THROUGHPUT=(--models small --length 1024 --batch 16 --max-batch 256 --steps 5 --warmup 2
                --compile both --precision bf16 --also-precision bf16-deepspeed --profile)
    LOSS=(--models small --length 1024 --batch 8 --repeats 3 --autocast bf16)
    CHECK=()
    SIZE=(data=builtin model=tiny model.length=128)
    # block diffusion's sampler at twice the context, the release's small model and vocabulary
    BD3_SAMPLING=(--hidden 768 --blocks 12 --heads 12 --vocab 50258 --length 2048
                  --block-size 16)
fi
"$PY" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"

# most wanted first: a step the budget no longer covers is skipped
step throughput 240 "$PY" benchmarks/bench_train.py --suite gpu --zero 1 "${THROUGHPUT[@]}"
step loss-path 90 "$PY" benchmarks/bench_train.py --suite loss --objectives subs,ar \
    --with-checkpointing --padding-baseline "${LOSS[@]}"
step logits 60 "$PY" benchmarks/gpu_checks.py logits "${CHECK[@]}"
step fused-loss 90 "$PY" benchmarks/gpu_checks.py fused-loss "${CHECK[@]}"

# a one-device DeepSpeed run (DeepSpeed's FusedAdam on CUDA, compiled by the first run and
# cached): straight, and killed at step 6 then resumed
TRAIN=("${SIZE[@]}" loader.global_batch_size=8 loader.batch_size=8 loader.eval_batch_size=8
       loader.num_workers=0 trainer.max_steps=12 checkpointing.every_n_steps=4
       trainer.val_check_interval=0 trainer.log_every_n_steps=1000 shards.num_proc=4
       lr_scheduler.num_warmup_steps=0)
step prepare 60 "$PY" -m pretrain.data.prepare "${SIZE[@]}" shards.num_proc=4 \
    hydra.run.dir="$WORK/prepare"
# (model.compile=auto: these compile the blocks on a GPU)
step train-straight 150 "$PY" -m pretrain "${TRAIN[@]}" hydra.run.dir="$WORK/straight"
# the killed run must fail: step() would count that as a failure
limit=$(limit_of 120)
wanted train-killed && echo "== train-killed (rank 0 kills itself after step 6; limit ${limit} s)"
if ! wanted train-killed; then
    :
elif [ "$limit" -ge 15 ]; then
    timeout -k 10 "$limit" "$PY" -m pretrain "${TRAIN[@]}" trainer.fail_at_step=6 \
        hydra.run.dir="$WORK/resumed" > "$WORK/killed.out" 2>&1
    echo "killed run exited $? (expected non-zero)"
    { echo "== train-killed"; cat "$WORK/killed.out"; } >> "$FULL_LOG"
else
    echo "gpu_check: step 'train-killed' skipped: the budget of $BUDGET s is spent"; failed=1
fi
step train-resume 120 "$PY" -m pretrain "${TRAIN[@]}" hydra.run.dir="$WORK/resumed"
step same-losses 30 "$PY" benchmarks/gpu_checks.py same-losses "$WORK/straight" "$WORK/resumed"

for check in syncs crop sampling-memory; do
    step "$check" 90 "$PY" benchmarks/gpu_checks.py "$check" "${CHECK[@]}"
done

if wanted fp16; then
    limit=$(limit_of 120)
    echo "== fp16 (limit ${limit} s)"
    [ "$limit" -ge 15 ] || limit=15  # the last step: a short run still says whether fp16 starts
    timeout -k 10 "$limit" "$PY" -m pretrain "${TRAIN[@]}" trainer.precision=fp16 \
        trainer.max_steps=4 hydra.run.dir="$WORK/fp16" > "$WORK/fp16.out" 2>&1
    rc=$?
    { echo "== fp16 (exit $rc)"; cat "$WORK/fp16.out"; } >> "$FULL_LOG"
    if [ "$DRY" = 1 ] || ! "$PY" -c "import torch; assert torch.cuda.is_available()" \
            2>/dev/null; then
        # no loss-scaled fp16 on a CPU: one sentence and exit 2
        grep -q "needs a CUDA GPU" "$WORK/fp16.out" && [ "$rc" -eq 2 ] \
            && ! grep -q Traceback "$WORK/fp16.out"
        ok=$?
    else
        [ "$rc" -eq 0 ] && "$PY" - "$WORK/fp16/metrics.jsonl" <<'PY'
import json, math, sys
losses = [json.loads(line)["loss"] for line in open(sys.argv[1])]
assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
PY
        ok=$?
    fi
    echo "{\"check\": \"fp16\", \"ok\": $([ $ok -eq 0 ] && echo true || echo false), \"exit\": $rc}" \
        | tee -a "$LOG"
    [ "$ok" -eq 0 ] || { failed=1; tail -n 5 "$WORK/fp16.out"; }
fi

# block diffusion, last (the steps above have run on a GPU before): a full run may leave
# them too little of the budget; GPU_CHECK_STEPS="bd3lm-flex bd3lm-sampling" runs them alone
step bd3lm-flex 180 "$PY" benchmarks/gpu_checks.py bd3lm-flex "${CHECK[@]}"
step bd3lm-sampling 120 "$PY" benchmarks/bench_bd3lm.py --suite sampling "${BD3_SAMPLING[@]}"

rm -rf "$WORK"
echo "gpu_check: $(( SECONDS - STARTED )) s"
if [ "$failed" -ne 0 ]; then
    echo "gpu_check: some checks failed (see above); results in $LOG, whole output in $FULL_LOG"
    exit 1
fi
echo "gpu_check: all checks passed; results in $LOG, whole output in $FULL_LOG"
