#!/usr/bin/env bash
# Deploy the SAM2 tracker's GPU build (function-gpu.yaml), like CVAT's serverless/deploy_gpu.sh.
# Everything else, options included, is deploy_cpu.sh's: run with --help to see them.
set -euo pipefail

exec "$(dirname "${BASH_SOURCE[0]}")/deploy_cpu.sh" --gpu "$@"
