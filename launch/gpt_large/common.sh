# Sourced by the gpt_large steps (after launch/common.sh's --help / --dry_run handling).
#
# Where everything goes: GPT_LARGE_ROOT (run_all.sh --root) puts raw/, data/ and runs/ under one folder
# anywhere (hundreds of GB for the real recipe); by default they are the repository's data/gpt_large/raw,
# data/gpt_large and runs/gpt_large, as configs/gpt_large.py names them. The sizes a rehearsal shrinks come from
# CONFIG, VOCAB, SEQ_SHORT / SEQ_LONG (the pretrain and 2048 stages' sequence lengths) and MIRROR.
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
HERE=$REPO/launch/gpt_large
CONFIG=${CONFIG:-$REPO/configs/gpt_large.py}
if [ -n "${GPT_LARGE_ROOT:-}" ]; then
  mkdir -p "$GPT_LARGE_ROOT"
  ROOT=$(cd "$GPT_LARGE_ROOT" && pwd)
  RAW=$ROOT/raw DATA=$ROOT/data RUNS=$ROOT/runs
else
  RAW=$REPO/data/gpt_large/raw DATA=$REPO/data/gpt_large RUNS=$REPO/runs/gpt_large
fi
TOKENIZER=$DATA/tokenizer
VOCAB=${VOCAB:-50256}
SEQ_SHORT=${SEQ_SHORT:-1024}
SEQ_LONG=${SEQ_LONG:-2048}
WORKERS=${WORKERS:-$(nproc)}
MIRROR=${MIRROR:-}

# stage -> the shards it trains on, and the run it starts from (the recipe's hand-over).
declare -A STAGE_DATA=([pretrain]=pretrain_1024 [pretrain_2048]=pretrain_2048 [sft]=sft [dpo]=dpo)
declare -A STAGE_FROM=([pretrain]="" [pretrain_2048]=pretrain [sft]=pretrain_2048 [dpo]=sft)

train_stage() {  # train_stage STAGE [overrides...]: this node's GPUs, or N nodes under sbatch (SLURM_NTASKS > 1)
  local stage=$1; shift
  local from=${STAGE_FROM[$stage]}
  local cmd=("$PY" -m mimix_jax.train --config "$CONFIG:$stage" --workdir "$RUNS/$stage"
             "--config.tokenizer_path=$TOKENIZER" "--config.data.train_path=$DATA/${STAGE_DATA[$stage]}"
             "--config.init_from=${from:+$RUNS/$from}" "$@")
  if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
    run srun --kill-on-bad-exit=1 "${cmd[@]}"
  else
    run "${cmd[@]}"
  fi
}

done_already() {  # done_already PATH NAME: a step's output that is complete (written last, atomically)
  if [ -e "$1" ]; then echo "have $2 ($1)"; return 0; fi
  return 1
}
