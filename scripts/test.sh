#!/usr/bin/env bash
# Set up the environment (first time only) and run the whole test suite: extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$NFNET_PY" -m pytest "$@"
