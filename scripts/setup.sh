#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the verified stack.
# Idempotent: when requirements/*.txt and pyproject.toml are unchanged since the last
# successful run, it only checks that the package imports (a second or two).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HW_DQ_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.hw-dq-stack.sha256"
want="$(cat "$ROOT"/requirements/*.txt "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$VENV/bin/python" -c "import hw_dq" 2>/dev/null; then
  exit 0
fi
echo "hw-dq setup: installing the stack into $VENV (first run takes a few minutes)" >&2
# pip warns about every package missing from this machine's local mirrors: drop that noise
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=(pip_quiet "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" -r "$ROOT/requirements/torch.txt"
"${PIP[@]}" -r "$ROOT/requirements/stack.txt" -r "$ROOT/requirements/dev.txt"
"${PIP[@]}" --no-deps -r "$ROOT/requirements/finn.txt"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null || "${PIP[@]}" --no-deps -e "$ROOT"
echo "$want" > "$STAMP"
