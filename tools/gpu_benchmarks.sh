#!/usr/bin/env bash
# The GPU figures in README, in one call on the device machine (H100/H200), every log under $OUT.
#
#   bash tools/gpu_benchmarks.sh [PLANES]        # default 64 planes of 4096 x 4096 uint8 = 1 Gpx
#   QUICK=1 SECONDS_MODEL=5 bash tools/gpu_benchmarks.sh 32   # the short form (what fits 4 device minutes)
#   RUNS=... FP16_RUNS=... choose the runs of steps 2 and 3 (FP16_RUNS= skips step 3)
#
# Expects the wheels of ../shared/tools/gpu-bench.md (plus imagecodecs) in .whl/ when segkit's
# dependencies are not installed. Each step logs and goes on when one fails.
set -u
PLANES=${1:-64}
OUT=${OUT:-/tmp/segkit-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}  # keeps a caller's (onnxruntime-gpu)
fi
export PYTHONUNBUFFERED=1
python3 -m compileall -q -j 0 /tmp/site segkit tools >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report the exit code
  local name=$1; shift
  local started=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - started)) s" | tee -a "$OUT/steps.txt"
}

# 1. correctness on the GPU: device pipeline == CPU pipeline, what the fast defaults change,
#    ONNX Runtime's CUDA provider when onnxruntime-gpu is importable
step gpu_checks timeout 150 python3 tools/gpu_checks.py ${QUICK:+--quick}
# 2. end to end against the model alone, the null engine and MONAI (same precision, same weights);
#    segkit-default is `segkit predict stack.tif --tile T` with no other flag (amp and batch chosen)
step bench_predict timeout 300 python3 tools/bench_predict.py --planes "$PLANES" --size 4096 --workdir /tmp/bp \
  --seconds "${SECONDS_MODEL:-10}" --runs "${RUNS:-model-device,model-only,null,segkit-default,monai-best}"
# 3. in fp16: the paper U-Net at its tile (goal 100 Mpx/s) and ONNX Runtime, on the same stack
[ -n "${FP16_RUNS-unet-572,segkit-onnx}" ] && step bench_fp16 timeout 150 python3 tools/bench_predict.py \
  --planes "$PLANES" --size 4096 --workdir /tmp/bp --amp fp16 --seconds "${SECONDS_MODEL:-10}" \
  --runs "${FP16_RUNS-unet-572,segkit-onnx}"
# 4. the paper U-Net compiled against eager (cold compile, then the cached one) and the start-up of one slice
step bench_compile timeout 300 python3 tools/bench_compile.py --warm
step bench_startup timeout 120 python3 tools/bench_startup.py --device cuda
# 5. training throughput: model alone, loader, on-device augmentation, full step (needs the ISBI data:
#    SEGKIT_DATA pointing at a carried copy, e.g. gpu-data/ with isbi2012/)
[ -d "${SEGKIT_DATA:-/nonexistent}/isbi2012" ] && step bench_train timeout 180 python3 tools/bench_train.py \
  recipes/em_neurons.yaml augment.on_device=true --device cuda --seconds 20
tail -n 1 "$OUT"/bench_*.log
