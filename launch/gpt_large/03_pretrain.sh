#!/usr/bin/env bash
USAGE="usage: launch/gpt_large/03_pretrain.sh [--config.FIELD=VALUE ...] [--dry_run]

Stage 'pretrain' of configs/gpt_large.py on one 8-GPU node (or N nodes: sbatch --nodes=N --ntasks-per-node=1 --gpus-per-node=8 launch/gpt_large/03_pretrain.sh).
Writes runs/gpt_large/pretrain; running it again resumes."
source "$(dirname "$0")/common.sh"
train_stage pretrain ${ARGS[@]+"${ARGS[@]}"}
