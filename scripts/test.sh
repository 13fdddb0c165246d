#!/usr/bin/env bash
# The README's test command, on a fresh machine too: sets up what the tests need on first use (scripts/setup.sh),
# then runs them (CPU only, generated data, nothing downloaded). Arguments go to pytest (e.g. -x, -k NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
exec python -m pytest -q "$@"
