#!/usr/bin/env bash
# The GPU check: one script, at most ~8 minutes on a machine with one NVIDIA GPU and a CUDA build of torch (2.11 or
# later, with its triton). Nothing is downloaded: packages the machine lacks (jsonargparse and what it needs) come as
# wheels in .whl/, fetched beforehand on a machine with a package index by benchmarks/gpu_wheels.sh.
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default: gpu_check_out/)
#
# 1. pytest -m gpu: the BN-LSTM on CUDA (the Triton steps) against the float64 reference loop, the baseline through
#    cuDNN, bf16-mixed and 16-mixed fits of a tiny config (tests/test_gpu.py);
# 2. benchmarks/run.py --device cuda in fp32 and bf16 at the MNIST, PTB and text8 shapes against cuDNN nn.LSTM
#    (results.json and results.md per dtype).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/bnlstm_site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/bnlstm_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
"$PY" - <<'PY' 2>&1 | tee "$OUT/machine.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed: the BN-LSTM runs the eager path on CUDA")
import bnlstm_lit.nn.triton_steps as ts
print("triton path available:", ts.available())
PY
status=0
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" || status=1
for dtype in fp32 bf16; do
    timeout 100 "$PY" benchmarks/run.py --device cuda --dtype "$dtype" --shape mnist ptb text8 \
        --impl lstm bnlstm bnlstm_eager bnlstm_plain --reps 5 --out "$OUT/bench_$dtype" 2>&1 \
        | tee "$OUT/bench_$dtype.log" || status=1
done
exit $status
