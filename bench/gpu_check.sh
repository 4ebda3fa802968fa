#!/usr/bin/env bash
# What a lent GPU is for, in one call: the GPU tests, then the bf16 engine benchmark of the 350M and 2B shapes
# (ours, compiled, against transformers). Runs from a checkout without installing it (the GPU image has torch and
# the rest); logs and the benchmark's JSON go to $OUT (the device tool's folder) or /tmp/gpu-check. Each part has
# its own time limit, so that the whole fits one 10-minute device call and a part that hangs costs only its share.
#
#   bash bench/gpu_check.sh        # knobs: SIZES="350M 2B" ROUNDS=2 SKIP_TESTS=1 TEST_TIMEOUT=150 BENCH_TIMEOUT=210
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$out/gpu.txt"

if [ -z "${SKIP_TESTS:-}" ]; then
    timeout "${TEST_TIMEOUT:-150}" "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

for size in ${SIZES:-350M 2B}; do
    timeout "${BENCH_TIMEOUT:-210}" "$python" bench/engine.py --device cuda --precisions bf16 --size "$size" --compile \
        --rounds "${ROUNDS:-2}" --workdir /tmp/codegen-lm-bench --json "$out/bench-$size.json" 2>&1 | tee "$out/bench-$size.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status
