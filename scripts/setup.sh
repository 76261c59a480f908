# Sourced by scripts/demo.sh and scripts/test.sh: picks the Python to run okd with and installs what is missing.
#
# The Python: $OKD_PYTHON if set, else the active virtual environment's, else ./.venv (created here on first use).
# Then torch (the CPU build on a Linux machine without an NVIDIA driver, from $OKD_TORCH_INDEX, by default PyTorch's
# CPU index: the default Linux build is the ~2.7 GB CUDA one), then okd itself from this checkout with the extras
# named in $OKD_EXTRAS, each only if it is missing.
set -euo pipefail

if [ -n "${OKD_PYTHON:-}" ]; then
    PY="$OKD_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
    PY="$VIRTUAL_ENV/bin/python"
else
    if [ ! -x .venv/bin/python ]; then
        echo "setup: creating the virtual environment .venv"
        python3 -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip
    fi
    PY="$PWD/.venv/bin/python"
fi

if ! "$PY" -c "import torch" 2>/dev/null; then
    if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "setup: installing torch (CPU build)"
        "$PY" -m pip install -q torch --extra-index-url "${OKD_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    else
        echo "setup: installing torch"
        "$PY" -m pip install -q torch
    fi
fi

# okd from this checkout, with the extras' modules importable (test: pytest and the optional extras the suite uses)
okd_here="$("$PY" -c 'import okd, pathlib; print(pathlib.Path(okd.__file__).resolve().parent.parent)' 2>/dev/null || true)"
if [ "$okd_here" != "$(pwd -P)" ] || ! "$PY" -c "${OKD_NEEDS:-pass}" 2>/dev/null; then
    echo "setup: installing okd from $PWD${OKD_EXTRAS:+ with [$OKD_EXTRAS]}"
    "$PY" -m pip install -q -e ".${OKD_EXTRAS:+[$OKD_EXTRAS]}"
fi
