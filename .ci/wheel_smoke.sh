#!/usr/bin/env bash
# CI: the wheel holds everything okd needs. Builds a wheel (not editable), checks that it ships the packaged
# configs, their recipes and the published figures, installs it into a fresh virtual environment (torch CPU build first)
# and, from an empty directory, trains a packaged config for two steps on a small CIFAR-10 subset.
# Usage: .ci/wheel_smoke.sh   (from anywhere; needs python3; the training step needs ../shared/data)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "wheel smoke: building the wheel"
# from a copy of the checkout's files (tracked and not ignored), so no build/ folder is left in the checkout
mkdir "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard | (cd "$repo" && xargs -0 cp -P --parents -t "$work/src")
python3 -m pip wheel -q --no-deps -w "$work/dist" "$work/src"
wheel=("$work"/dist/okd-*.whl)
[ -f "${wheel[0]}" ] || { echo "wheel smoke: no okd wheel was built" >&2; exit 1; }

python3 - "${wheel[0]}" "$repo" <<'EOF'
import pathlib, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
repo = pathlib.Path(sys.argv[2])
configs = repo / "okd" / "configs"
want = {p.relative_to(repo).as_posix() for p in [*configs.glob("*/*.yaml"), *configs.glob("recipes/*/*.yaml")]}
if not any("/recipes/" in w for w in want) or len(want) == sum("/recipes/" in w for w in want):
    sys.exit("wheel smoke: the sources hold no okd/configs/*/*.yaml or no okd/configs/recipes/*/*.yaml")
want.add("okd/report/published.csv")
missing = sorted(want - names)
if missing:
    sys.exit(f"wheel smoke: the wheel lacks {len(missing)} packaged files, e.g. {missing[:5]}")
print(f"wheel smoke: the wheel holds all {len(want) - 1} packaged configs and recipes and okd/report/published.csv")
EOF

python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
unset PYTHONPATH  # okd must come from the wheel, not from a checkout
python -m pip install -q torch==2.13.0
python -m pip install -q "${wheel[0]}"

data="$repo/../shared/data"
if [ ! -f "$data/make_cifar10.py" ]; then
    echo "wheel smoke: skipped the training step: $data (the CIFAR-10 copy) is absent"
    exit 0
fi
python -m pip install -q pillow  # make_cifar10.py decodes the JPEG copy with Pillow (not an okd dependency)
python "$data/make_cifar10.py" "$work/cifar10" --limit-train 200 --limit-test 100 >/dev/null

mkdir "$work/empty"
cd "$work/empty"
OMP_NUM_THREADS=1 okd train cifar10/ffsd_resnet20 "data.root=$work/cifar10" data.download=false \
    train.epochs=1 data.limit_train=64 data.limit_test=32 train.max_steps_per_epoch=2 train.progress=log \
    "output_dir=$work/runs" name=smoke
run="$work/runs/smoke"
for f in deploy.pt last.pt metrics.csv config.yaml; do
    [ -f "$run/$f" ] || { echo "wheel smoke: the run folder lacks $f" >&2; exit 1; }
done
where="$(python -c 'import okd; print(okd.__file__)')"
case "$where" in
    "$work/venv/"*) echo "wheel smoke: okd ran from the installed wheel ($where)" ;;
    *) echo "wheel smoke: okd was imported from $where, not from the wheel" >&2; exit 1 ;;
esac
echo "wheel smoke: ok (run folder holds deploy.pt, last.pt, metrics.csv, config.yaml)"
