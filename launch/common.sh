# Sourced by every launch script: repo root, python, --help and --dry_run (print the commands, run nothing).
# A script sets USAGE before sourcing this file.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY_RUN=${DRY_RUN:-0}
ARGS=()
for a in "$@"; do
  case "$a" in
    -h|--help) echo "$USAGE"; exit 0 ;;
    --dry_run|--dry-run) DRY_RUN=1 ;;
    *) ARGS+=("$a") ;;
  esac
done
run() {
  echo "+ $*"
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}
