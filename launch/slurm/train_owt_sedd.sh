#!/bin/bash
#SBATCH -J train_owt_sedd
#SBATCH -o logs/%x_%j.out
#SBATCH -e logs/%x_%j.err
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH -t 48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
# SEDD (time conditioned) small on OpenWebText, L=1024.
# Validation runs 16 sequences per GPU (its samples hold 16 x 1024 x 50258 float32
# probabilities per step, 3.3 GB each): well inside 80 GB.
source "$(dirname "$0")/common.sh" 2>/dev/null || source launch/slurm/common.sh
mdlm_srun mode=train data=openwebtext-split model=small parameterization=sedd time_conditioning=True model.length=1024 loader.global_batch_size=512 loader.batch_size=32 loader.eval_batch_size=16 trainer.max_steps=1000000 trainer.deepspeed_config=zero2 "$@"
