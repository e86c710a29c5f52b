#!/usr/bin/env bash
# Install everything the tests need (see scripts/setup.sh), then run the whole suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k redis
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python -m pytest "$@"
