#!/bin/bash
#SBATCH -J eval_owt_mdlm
#SBATCH -o logs/%x_%j.out
#SBATCH -e logs/%x_%j.err
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH -t 04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
# Test perplexity of an MDLM checkpoint on OpenWebText's validation split (CKPT=path or hub id).
source "$(dirname "$0")/common.sh" 2>/dev/null || source launch/slurm/common.sh
mdlm_srun mode=ppl_eval data=openwebtext-split model=small parameterization=subs backbone=dit model.length=1024 eval.checkpoint_path="$CKPT" loader.eval_batch_size=16 "$@"
