#!/usr/bin/env bash
# Source this: creates (once) or reuses a virtual environment cached outside the clone, keyed by
# a hash of the dependency files and the Python version, then points it at this checkout.
# Afterwards $NFNET_PY is the environment's python. Needs only Python 3.10+ on the machine.
set -euo pipefail
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_python=${PYTHON:-python3}
_key=$( { cat "$_root/pyproject.toml" "$_root/scripts/env.sh"; "$_python" -VV; } | sha256sum | cut -c1-16)
_cache=${NFNET_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nfnet-lightning}
_venv=$_cache/venv-$_key
if [ ! -f "$_venv/.complete" ]; then
    echo "[env] creating $_venv (first run: installs torch and friends, a few minutes)" >&2
    rm -rf "$_venv"
    mkdir -p "$_cache"
    "$_python" -m venv "$_venv"
    "$_venv/bin/python" -m pip install --quiet --upgrade "pip>=24" "setuptools>=68" wheel
    # The dev extra carries the test dependencies (the sweeps and video extras are tested too);
    # torch comes from the registry's standard build (never a +cpu wheel: torchvision cannot
    # load its ops with one).
    "$_venv/bin/python" -m pip install --quiet -e "$_root[dev,sweeps,video]"
    touch "$_venv/.complete"
fi
# The environment outlives this clone, so the editable install is re-pointed at it every time.
if ! _out=$("$_venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$_root" 2>&1); then
    echo "$_out" >&2
    exit 1
fi
export NFNET_PY=$_venv/bin/python
export NFNET_VENV=$_venv
