#!/usr/bin/env bash
# Every GPU figure of docs/PERFORMANCE.md ("GPU" section), on one H200, in about 8 minutes:
#
#     bash benchmarks/gpu_plan.sh
#
# Needs only the project and its Python dependencies (torch with CUDA, torchvision, lightning,
# timm, hydra-core, omegaconf). A machine without Hydra (the lent H200 image) takes wheels carried
# in .whl/ (docs/PERFORMANCE.md, "GPU"). Each part has its own time limit, so one that hangs or fails
# costs only its own figures; the tables are printed and written to benchmarks/results/*_cuda.*
# (and copied to $OUT when that is set).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/nfnet-site .whl/*.whl \
            && export PYTHONPATH=/tmp/nfnet-site:$PYTHONPATH
    else
        echo "hydra-core and omegaconf are missing and no wheels are in .whl/: the fit figures will fail" >&2
    fi
fi
start=$(date +%s)
run() {  # run <seconds> <python args...>
    local limit=$1; shift
    echo "== [$(( $(date +%s) - start )) s] $*"
    timeout "$limit" "$PY" "$@" || echo "!! failed or over ${limit} s: $*"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1. The F0 step, ours against timm's in the same rounds: bf16 autocast, channels_last, batch 128;
#    eager and CUDA graphs (torch.compile reduce-overhead); the eager NCHW row for the old table.
run 210 benchmarks/train_step.py --device cuda --batch 128 --precision bf16 --layout cl --exec eager cudagraphs \
    --rounds 10 --warmup 3 --memory none --no-ref --out benchmarks/results/train_step_cuda
run 60 benchmarks/train_step.py --device cuda --batch 128 --precision bf16 --layout nchw --exec eager \
    --rounds 10 --memory none --no-ref --out benchmarks/results/train_step_cuda_nchw
# 2. The real fit loop from JPEG files with the GPU input pipeline (and, for comparison, CPU decoding).
run 150 benchmarks/fit_throughput.py --device cuda --batch 128 --precision bf16 --layout cl \
    --compile reduce-overhead --decode gpu --workers 8 --steps 60 --warmup-steps 20 --no-raw \
    --out benchmarks/results/fit_throughput_cuda
run 90 benchmarks/fit_throughput.py --device cuda --batch 128 --precision bf16 --layout cl \
    --compile false --decode cpu --workers 14 --steps 30 --warmup-steps 10 --no-raw \
    --out benchmarks/results/fit_throughput_cuda_cpu_decode
# 3. The device input pipeline's own rate, and nvjpeg against libjpeg.
run 60 benchmarks/data.py --device cuda --device-batch 256 --batches 3
# 4. Activation checkpointing: F3 at 320 px (measured) and F7 at 416 px.
run 60 benchmarks/memory.py --device cuda --precision bf16 --model nfnet_f3 --size 320 --out benchmarks/results/memory_cuda
run 60 benchmarks/memory.py --device cuda --precision bf16 --model nfnet_f7 --size 416 --batches 8 16 \
    --out benchmarks/results/memory_cuda_f7
# 5. The GPU-only tests: the device-side step (bit-exact, no host sync, one CUDA graph) and the pipeline.
run 150 -m pytest -q -m gpu tests/test_step_cuda.py tests/test_device_pipeline.py tests/test_batched_randaugment.py

echo "== done in $(( $(date +%s) - start )) s"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp benchmarks/results/*cuda*.md "$OUT"/ 2>/dev/null || true
fi
