# Sourced by the gpt_large steps. Paths here match configs/gpt_large.py (tokenizer_path, data.train_path, and the
# default run directories runs/gpt_large/<stage> that each stage's init_from points at).
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
RAW=data/gpt_large/raw
DATA=data/gpt_large
RUNS=runs/gpt_large
TOKENIZER=$DATA/tokenizer
WORKERS=${WORKERS:-$(nproc)}
train_stage() {  # train_stage STAGE [overrides...]: one 8-GPU node, or N nodes under sbatch (SLURM_NTASKS > 1)
  local stage=$1; shift
  if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
    run srun --kill-on-bad-exit=1 "$PY" -m mimix_jax.train --config configs/gpt_large.py:"$stage" --workdir "$RUNS/$stage" "$@"
  else
    run "$PY" -m mimix_jax.train --config configs/gpt_large.py:"$stage" --workdir "$RUNS/$stage" "$@"
  fi
}
