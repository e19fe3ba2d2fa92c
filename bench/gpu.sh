#!/usr/bin/env bash
# The prepared GPU run of bench/gpu.py (about 6-8 minutes on one H200): writes bench/results/gpu.json.
#   bench/gpu.sh                 # CUDA device 0, 450 s budget
#   bench/gpu.sh --max-seconds 300
#   bench/gpu.sh --device cpu --smoke   # the tiny code-path check
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu --json "$@"
