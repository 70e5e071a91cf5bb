# Sourced by every launch script (after it set USAGE): the repository, python, --help and --dry_run (print the
# commands, run nothing). Nothing changes directory: relative paths mean what they mean where you typed them.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
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
