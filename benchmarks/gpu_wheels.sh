#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels benchmarks/gpu_check.sh installs on a GPU machine that has
# torch, lightning, torchmetrics, tensorboard and pytest but no network: jsonargparse (with its "signatures" extra)
# and what they need, for the GPU machine's Python (default 3.12), into .whl/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    "jsonargparse==$(python3 -c 'import jsonargparse; print(jsonargparse.__version__)')" \
    docstring-parser typeshed-client
ls .whl
