#!/usr/bin/env bash
# GPU evidence in one command (at most 9 minutes on one H100/H200): smoke, speed and accuracy sections, every
# result under OUT, a summary printed at the end. See benchmarks/README.md ("GPU check").
#
#   bash benchmarks/gpu_check.sh OUT --data CIFAR10_DIR      # on a GPU
#   bash benchmarks/gpu_check.sh OUT --dry-run               # the same sections on the CPU, tiny step counts
#
# CIFAR10_DIR: an official-layout root (holding cifar-10-batches-py/), or a folder holding cifar10-jpeg.npz and
# make_cifar10.py (decoded there first). The logic lives in benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT [--dry-run] [--data CIFAR10_DIR] [--work DIR]" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
