#!/usr/bin/env bash
# Set up the environment (first time only) and train: extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$NFNET_PY" train.py "$@"
