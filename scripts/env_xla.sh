#!/usr/bin/env bash
# Source this: creates (once) or reuses the torch-xla virtual environment, cached outside the clone
# like scripts/env.sh's, then points it at this checkout. Afterwards $NFNET_XLA_PY is its python.
#
# Why a second environment: torch-xla is built against one exact torch release (2.9.0 here), while
# the main environment follows the newest torch. The key hashes the pins below, pyproject.toml,
# this script and the Python version, so changing any of them builds a fresh environment.
set -euo pipefail
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_python=${PYTHON:-python3}
# torch-xla 2.9.0's wheel does not declare its torch requirement, yet it only loads into the torch
# it was compiled with, so torch is pinned exactly; torchvision 0.24.0 is the release paired with
# torch 2.9.0. The explicit pin also keeps pip away from the CPU-only torch 2.13 wheel that a
# machine-wide find-links directory may offer.
_pins=$'torch==2.9.0\ntorchvision==0.24.0\ntorch-xla==2.9.0'
_key=$( { printf '%s\n' "$_pins"; cat "$_root/pyproject.toml" "$_root/scripts/env_xla.sh"; "$_python" -VV; } \
        | sha256sum | cut -c1-16)
_cache=${NFNET_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nfnet-lightning}
_venv=$_cache/venv-xla-$_key
mkdir -p "$_cache"
if [ ! -f "$_venv/.complete" ]; then
    # Two CI runs starting together must not both build into the same directory.
    exec {_lock}>"$_venv.lock"
    flock "$_lock"
    if [ ! -f "$_venv/.complete" ]; then
        echo "[env-xla] creating $_venv (first run: downloads torch 2.9 + torch-xla, several minutes)" >&2
        rm -rf "$_venv"
        "$_python" -m venv "$_venv"
        "$_venv/bin/python" -m pip install --quiet --upgrade "pip>=24" "setuptools>=68" wheel
        _constraints=$_venv/constraints.txt
        printf '%s\n' "$_pins" > "$_constraints"
        # One resolve for everything, under the pins: the project's own dependencies (lightning
        # 2.6 and torchmetrics accept torch 2.9) plus the test tools and torch-xla itself. Not
        # the `tpu` extra: on a TPU VM that may also bring libtpu, which the CPU tests never load.
        "$_venv/bin/python" -m pip install --quiet -c "$_constraints" -e "$_root[dev]" torch-xla
        "$_venv/bin/python" - <<'PY'
import torch, torch_xla  # fail the build here rather than in the first test
assert torch.__version__.startswith("2.9."), torch.__version__
PY
        touch "$_venv/.complete"
    fi
    flock -u "$_lock"
fi
# The environment outlives this clone, so the editable install is re-pointed at it every time.
if ! _out=$("$_venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$_root" 2>&1); then
    echo "$_out" >&2
    exit 1
fi
export NFNET_XLA_PY=$_venv/bin/python
export NFNET_XLA_VENV=$_venv
