#!/usr/bin/env bash
# Install the tracker's dependencies, then serve it on http://127.0.0.1:8080 with the embedded
# state store. Configure it with the environment variables in the README; extra arguments go to
# server.py (e.g. --host 0.0.0.0 --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python server.py "$@"
