#!/usr/bin/env bash
# Set up nasfcos from nothing: a virtual environment in .venv with the pinned torch/torchvision (constraints.txt)
# and the package installed in editable mode with its test, ONNX and Ray extras. Safe to run again: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${NASFCOS_PYTHON:-}"
if [ -z "$PYTHON" ]; then
  # torch==2.14.1 wheels exist for CPython 3.11 on this machine's mirror; prefer it.
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.nasfcos-installed"
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned dependencies (constraints.txt) and nasfcos"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,onnx,ray]" 2> >(grep -v "^WARNING: Location" >&2)
  echo "$want" > "$stamp"
fi
.venv/bin/python - <<'PY'
import torch, torchvision
print(f"[setup] ready: torch {torch.__version__}, torchvision {torchvision.__version__}")
PY
