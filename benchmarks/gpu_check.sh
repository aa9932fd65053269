#!/usr/bin/env bash
# The GPU checks in one run (about 9 minutes at most): the gpu-marked tests on CUDA, the
# full protocol (today's loop against the engine and the batched path, with and without CUDA
# graphs), the caching pass with --decode gpu / cpu against the bare forward, and
# EfficientNet-Lite0's top-1 with each decode. Every figure goes to stdout and to $OUT/gpu_report.txt.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu bash benchmarks/gpu_check.sh      # dry run on a CPU: tiny sizes, same steps
#
# Each step has its own timeout; a step that fails or times out is reported and the next runs.
set -u
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
REPORT="$OUT/gpu_report.txt"
: > "$REPORT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "$@" | tee -a "$REPORT"; }
step() {  # step SECONDS TITLE COMMAND...: run with a timeout, output to stdout and the report
    local limit=$1 title=$2; shift 2
    say ""; say "=== $title (timeout ${limit}s) ==="
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$REPORT"
    local code=${PIPESTATUS[0]}
    say "--- $title: exit $code in $((SECONDS - started)) s$([ "$code" = 124 ] && echo ' (TIMED OUT)')"
}

if [ "$DEVICE" = cuda ]; then
    ROWS=32000; VAL=8000; RANKS="2 4 8 16 32 64 128"; METHODS="sparse int1"
    SUB_RANKS="8"; SUB_EPOCHS=2; IMAGES=512; REPEATS=5; TRIALS=10; THREADS=()
    PYTEST_DEVICE=(-m gpu --device cuda)
else  # dry run: the same steps on tiny sizes, so the script itself is tested end to end
    ROWS=1000; VAL=250; RANKS="2 8"; METHODS="sparse"
    SUB_RANKS="2"; SUB_EPOCHS=2; IMAGES=16; REPEATS=5; TRIALS=3; THREADS=(--threads 1)
    PYTEST_DEVICE=(tests/test_batched.py -k "alone and ce")
fi

say "gpu_check.sh, DEVICE=$DEVICE, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
step 20 "machine" bash -c 'nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python -c "import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\")"; nproc'
step 120 "tests on $DEVICE" python -m pytest -q -p no:cacheprovider "${PYTEST_DEVICE[@]}" tests/
# Today's loop is too slow for the full protocol here: compare all variants on a subset of it
# (same rows, fewer ranks and epochs), then time the batched path alone on the full protocol.
step 150 "protocol subset: loop vs engine vs batched (graphs on / off)" python -m benchmarks.bench_full_protocol \
    --device "$DEVICE" --rows "$ROWS" --val "$VAL" --methods sparse --ranks $SUB_RANKS \
    --epochs "$SUB_EPOCHS" --trials "$TRIALS" --repeats "$REPEATS" "${THREADS[@]}" \
    --variants loop engine batched batched-nographs
step 120 "full protocol, batched path (one repetition: a single run, not a median)" \
    python -m benchmarks.bench_full_protocol --device "$DEVICE" --rows "$ROWS" --val "$VAL" \
    --methods $METHODS --ranks $RANKS --trials "$TRIALS" --repeats 1 "${THREADS[@]}" \
    --variants batched
DECODES="cpu"; [ "$DEVICE" = cuda ] && DECODES="cpu gpu"
PASSES="cpu"; [ "$DEVICE" = cuda ] && PASSES="cpu gpu gpu-serial"  # gpu-serial: no read-ahead
step 90 "caching pass: decode vs bare forward" python -m benchmarks.bench_feature_extraction \
    --images "$IMAGES" --decode $PASSES --repeats "$REPEATS"
if [ -d ../shared/imagenet-sample ]; then
    WEIGHTS=(); [ -f weights/tf_efficientnet_lite0.safetensors ] && \
        WEIGHTS=(--weights weights/tf_efficientnet_lite0.safetensors)
    step 50 "EfficientNet-Lite0 top-1, gpu vs cpu decode" python -m benchmarks.decode_accuracy \
        --data ../shared/imagenet-sample --decode $DECODES "${WEIGHTS[@]}"
else
    say ""; say "=== EfficientNet-Lite0 top-1: skipped, ../shared/imagenet-sample is absent ==="
fi
say ""; say "report: $REPORT"
