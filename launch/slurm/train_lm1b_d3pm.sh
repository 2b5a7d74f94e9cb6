#!/bin/bash
#SBATCH -J train_lm1b_d3pm
#SBATCH -o logs/%x_%j.out
#SBATCH -e logs/%x_%j.err
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH -t 24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
# Absorbing D3PM (T=1000) on LM1B, L=128.
source "$(dirname "$0")/common.sh" 2>/dev/null || source launch/slurm/common.sh
mdlm_srun mode=train data=lm1b model=small parameterization=d3pm T=1000 model.length=128 loader.global_batch_size=512 loader.batch_size=64 loader.eval_batch_size=64 trainer.max_steps=1000000 trainer.deepspeed_config=zero2 "$@"
