#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one device call (its image has torch, triton and
# transformers but not trl, datasets or this package):
#   make device-wheels                      # here, once: trl, datasets and their missing pure-Python deps
#   device run, carry [".device-wheels"]:   bash benchmarks/gpu_session.sh [tests,kernel,overhead]
# The argument picks stages (default all three; their timeouts add up to 580 s, under one call's 600 s: if a stage
# runs out, rerun it alone at once, while the machine is warm). Writes at most 8 files under $OUT (the device tool
# brings back 8): the GPU's name and versions, the CUDA test log, and the kernel and overhead benchmarks' JSON,
# markdown and PNG. KERNEL_ARGS / OVERHEAD_ARGS replace the benchmarks' arguments (e.g. `--quick` / `--preset
# tiny` for a dry run on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-session}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if compgen -G ".device-wheels/*.whl" >/dev/null; then
    $PY -m pip install --quiet --no-index --no-deps .device-wheels/*.whl
fi
$PY -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  $PY -c "import torch, triton, transformers, trl; print(torch.__version__, triton.__version__, transformers.__version__, trl.__version__)"
} > "$OUT/device.txt" 2>&1

STAGES=${1:-tests,kernel,overhead}

if [[ $STAGES == *tests* ]]; then  # kernel and fusion tests run on CUDA when it is there (tests/conftest.py)
    timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_kernel_triton.py \
        tests/test_fusion.py > "$OUT/tests.log" 2>&1
    echo "tests: exit $?" >> "$OUT/device.txt"
fi
if [[ $STAGES == *kernel* ]]; then
    # shellcheck disable=SC2086
    timeout "${KERNEL_TIMEOUT:-150}" $PY -m r2m bench kernel ${KERNEL_ARGS:---preset gpu} --out "$OUT/kernel"
    echo "kernel benchmark: exit $?" >> "$OUT/device.txt"
fi
if [[ $STAGES == *overhead* ]]; then
    # 0.5B policy and RM, 512 + 512 tokens: each step is mostly generation, so few steps and one A/B round
    # shellcheck disable=SC2086
    timeout "${OVERHEAD_TIMEOUT:-280}" $PY -m r2m bench overhead \
        ${OVERHEAD_ARGS:---preset gpu --steps 3 --warmup 1 --rounds 1} --out "$OUT/overhead"
    echo "overhead benchmark: exit $?" >> "$OUT/device.txt"
fi
cat "$OUT/device.txt"
