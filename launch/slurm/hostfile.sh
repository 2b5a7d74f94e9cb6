#!/usr/bin/env bash
# Writes a DeepSpeed hostfile for the current slurm allocation ("host slots=N" per node),
# for running the `deepspeed` launcher across the allocation instead of srun:
#   bash launch/slurm/hostfile.sh > hostfile
#   deepspeed --hostfile hostfile --no_local_rank --module pretrain <overrides>
# (the launcher then receives slurm's signals itself; prefer srun, used by the job scripts,
# when preemption must end in a checkpoint).
set -euo pipefail
slots=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
for host in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    echo "$host slots=$slots"
done
