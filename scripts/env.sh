#!/usr/bin/env bash
# Source this: creates (once) or reuses a virtual environment cached outside the clone, keyed by
# a hash of the dependency files and the Python version, then points it at this checkout.
# Afterwards the environment's bin/ is first on PATH (so `python train.py` runs in it), $NFNET_PY
# is its python and $NFNET_VENV its folder. Needs only Python 3.10+ on the machine.
#
# Safe to source in an interactive shell: the set-up runs in a subshell, so its `set -e` and its
# exit on failure never reach the caller's shell; a failure returns status 1.
_nfnet_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_nfnet_python=${PYTHON:-python3}
_nfnet_key=$( { cat "$_nfnet_root/pyproject.toml" "$_nfnet_root/scripts/env.sh"; "$_nfnet_python" -VV; } | sha256sum | cut -c1-16)
_nfnet_venv=${NFNET_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nfnet-lightning}/venv-$_nfnet_key
(
    set -euo pipefail
    venv=$_nfnet_venv
    if [ ! -f "$venv/.complete" ]; then
        echo "[env] creating $venv (first run: installs torch and friends, a few minutes)" >&2
        rm -rf "$venv"
        mkdir -p "$(dirname "$venv")"
        "$_nfnet_python" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade "pip>=24" "setuptools>=68" wheel
        # The dev extra carries the test dependencies (the sweeps and video extras are tested
        # too); torch comes from the registry's standard build (never a +cpu wheel: torchvision
        # cannot load its ops with one).
        "$venv/bin/python" -m pip install --quiet -e "$_nfnet_root[dev,sweeps,video]"
        touch "$venv/.complete"
    fi
    # The environment outlives this clone, so the editable install is re-pointed at it every time.
    if ! out=$("$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$_nfnet_root" 2>&1); then
        echo "$out" >&2
        exit 1
    fi
)
_nfnet_status=$?
if [ "$_nfnet_status" -ne 0 ]; then
    echo "[env] setting up $_nfnet_venv failed (see above)" >&2
    unset _nfnet_root _nfnet_python _nfnet_key _nfnet_venv _nfnet_status
    return 1 2>/dev/null || exit 1
fi
export NFNET_VENV=$_nfnet_venv
export NFNET_PY=$NFNET_VENV/bin/python
case ":$PATH:" in
    *":$NFNET_VENV/bin:"*) ;;
    *) export PATH="$NFNET_VENV/bin:$PATH" ;;
esac
unset _nfnet_root _nfnet_python _nfnet_key _nfnet_venv _nfnet_status
