# Sourced by the job scripts here: one task per GPU started by srun, with the rank variables
# the code reads (RANK, WORLD_SIZE, LOCAL_RANK come from SLURM_PROCID, SLURM_NTASKS and
# SLURM_LOCALID inside pretrain.distributed); MASTER_ADDR/PORT point at the first node.
# srun starts the ranks directly, so slurm's USR1 (sent 120 s before the time limit, see
# --signal) and a preemption's TERM reach every rank: each saves a checkpoint and exits 0,
# and --requeue runs the job again, which resumes from that checkpoint.
set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Across nodes, NCCL (the training collectives) and gloo (the group the ranks wait on while
# rank 0 builds token shards) each pick a network interface; on nodes with several (ib0,
# eth0, docker0, ...) name the one that reaches the other nodes, e.g. NCCL_SOCKET_IFNAME=ib0
# at submission. gloo takes NCCL's choice when only that one is given and it names whole
# interfaces of this node (NCCL also reads prefixes, "ib", and exclusions, "^docker"; gloo
# does not: then set GLOO_SOCKET_IFNAME=ib0 yourself).
gloo_ifname() {
    local names=${NCCL_SOCKET_IFNAME#=} name
    for name in ${names//,/ }; do
        [ -e "/sys/class/net/$name" ] || return 1
    done
    echo "$names"
}
if [ -n "${NCCL_SOCKET_IFNAME:-}" ] && [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
    if names=$(gloo_ifname); then
        export GLOO_SOCKET_IFNAME=$names
    fi
fi
# A run directory that survives requeues: checkpoints resume from here.
RUN_DIR=${RUN_DIR:-$PWD/outputs/$SLURM_JOB_NAME}
mkdir -p "$RUN_DIR" logs
# A run stopped by USR1/TERM saves, exits 0 and leaves $RUN_DIR/requeue: put the job back
# in the queue (--requeue alone only covers preemption and node failure). A job ended by
# scancel or a preemption saves and leaves that file too, but its batch shell is killed
# before it can act on it: clear it first, or this run would requeue after finishing.
mdlm_srun() {
    rm -f "$RUN_DIR/requeue"
    srun --kill-on-bad-exit=1 python -u -m pretrain hydra.run.dir="$RUN_DIR" "$@"
    if [ -f "$RUN_DIR/requeue" ]; then
        rm -f "$RUN_DIR/requeue"
        scontrol requeue "$SLURM_JOB_ID"
    fi
}
