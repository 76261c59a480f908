#!/usr/bin/env bash
# The demo: set up okd (scripts/setup.sh) and train FFSD (two ResNet-20 students and a leader) on 20,000 CIFAR-10
# images for 2 epochs, scored on the 10,000 test images; it ends with the run's summary. bf16 where the CPU computes
# it natively (avx512_bf16 or AMX), else fp32 (about twice the time). A few minutes on a laptop CPU (README).
# CIFAR-10 comes from $OKD_CIFAR10 (the folder containing cifar-10-batches-py/, or that folder itself), else it is
# downloaded into data/ (170 MB). Extra key=value arguments are passed on to okd train.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

root=data
if [ -n "${OKD_CIFAR10:-}" ]; then
    if [ -d "$OKD_CIFAR10/cifar-10-batches-py" ]; then
        root="$OKD_CIFAR10"
    elif [ "$(basename "$OKD_CIFAR10")" = cifar-10-batches-py ]; then
        root="$(dirname "$OKD_CIFAR10")"
    else
        echo "demo: OKD_CIFAR10=$OKD_CIFAR10 holds no cifar-10-batches-py/ (unset it to download CIFAR-10 into data/)" >&2
        exit 2
    fi
fi

precision=fp32
if grep -qsE "avx512_bf16|amx_bf16" /proc/cpuinfo; then
    precision=bf16
fi

# the demo run (tests/cli/test_demo.py reads the line below)
exec "$PY" -m okd train cifar10/ffsd_resnet20 data.limit_train=20000 train.epochs=2 seed=2 \
    train.precision="$precision" name="demo-$(date -u +%Y%m%dT%H%M%S)" data.root="$root" "$@"
