#!/usr/bin/env bash
# The test suite: set up okd with its test extra (scripts/setup.sh), then run pytest on tests/ (what CI runs, .ci/run).
# Arguments go to pytest: scripts/test.sh -m "not slow" is the fast subset (README). The end-to-end tests train on a
# 2,000/500 subset of CIFAR-10 from $OKD_CIFAR10 (the folder containing cifar-10-batches-py/) or ../shared/data, and
# are skipped, with the reason, where neither exists.
set -euo pipefail
cd "$(dirname "$0")/.."
OKD_EXTRAS=test OKD_NEEDS="import pytest, ruff, importlinter, PIL, matplotlib, onnx, onnxruntime, tensorboard, submitit, safetensors"
. scripts/setup.sh
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
