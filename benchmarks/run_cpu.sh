#!/usr/bin/env bash
# The CPU benchmark matrix of issue 6: baseline and FFSD ResNet-32 (CIFAR-100 configs, batch 128), okd path vs
# the reference path in the same run, for fp32 / channels_last / bf16 / bf16+channels_last (+ compile with
# COMPILE=1; compiled runs also time the uncompiled step, --also-eager). Rows are appended to $CSV (default
# results/bench.csv), passed explicitly as --csv.
#
#   benchmarks/run_cpu.sh                      # the whole matrix once
#   REPEATS=3 THREADS=2 benchmarks/run_cpu.sh  # three passes, two torch threads
#   ONLY=ffsd VARIANTS="bf16_cl" benchmarks/run_cpu.sh
#
# Data: the config's dataset under data.root if present (DATA_ROOT=...), else synthetic uint8 images of the
# same shape (the `data` column says which; speed does not depend on pixel values).
set -euo pipefail
cd "$(dirname "$0")/.."

CSV=${CSV:-results/bench.csv}
THREADS=${THREADS:-1}          # 1: on a shared 2-core host, spinning OpenMP threads make 2 threads far slower
REPEATS=${REPEATS:-1}
ONLY=${ONLY:-"baseline ffsd"}
VARIANTS=${VARIANTS:-"fp32 cl bf16 bf16_cl"}
if [[ "${COMPILE:-0}" == 1 && " $VARIANTS " != *" bf16_cl_compile "* ]]; then VARIANTS="$VARIANTS bf16_cl_compile"; fi
BENCH=${BENCH:-"python -m okd.bench"}  # the same as "okd bench"
DATA=()
if [[ -n "${DATA_ROOT:-}" ]]; then DATA=("data.root=$DATA_ROOT"); fi

declare -A FLAGS=(
  [fp32]="train.channels_last=false"
  [cl]="train.channels_last=true"
  [bf16]="train.precision=bf16 train.channels_last=false"
  [bf16_cl]="train.precision=bf16 train.channels_last=true"
  [bf16_cl_compile]="train.precision=bf16 train.channels_last=true train.compile=true"
)
declare -A STEPS=([baseline]=20 [ffsd]=12)
declare -A WINDOWS=([baseline]=5 [ffsd]=4)

for ((r = 1; r <= REPEATS; r++)); do
  for method in $ONLY; do
    for variant in $VARIANTS; do
      echo "=== pass $r/$REPEATS: $method resnet32, $variant"
      EXTRA=()
      if [[ "$variant" == *compile* ]]; then EXTRA=(--also-eager); fi  # compiled/eager ratio from the same run
      # shellcheck disable=SC2086
      $BENCH "cifar100/${method}_resnet32" train.device=cpu ${FLAGS[$variant]} "${DATA[@]}" \
        --steps "${STEPS[$method]}" --warmup 3 --windows "${WINDOWS[$method]}" --threads "$THREADS" "${EXTRA[@]}" --csv "$CSV"
    done
  done
done
