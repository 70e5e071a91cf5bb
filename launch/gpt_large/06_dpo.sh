#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/06_dpo.sh [--config.FIELD=VALUE ...] [--dry_run]

Stage 'dpo' of configs/gpt_large.py on one 8-GPU node (or N nodes: sbatch --nodes=N --ntasks-per-node=1 --gpus-per-node=8 launch/gpt_large/06_dpo.sh).
Writes runs/gpt_large/dpo; running it again resumes."
source "$(dirname "$0")/common.sh"
train_stage dpo ${ARGS[@]+"${ARGS[@]}"}
