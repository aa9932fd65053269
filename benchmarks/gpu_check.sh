#!/usr/bin/env bash
# The GPU checks in one run (9 minutes at most): the gpu-marked tests on CUDA, the full
# protocol (today's loop against the engine and the batched path, with and without CUDA
# graphs), the caching pass with --decode gpu / cpu against the bare forward,
# EfficientNet-Lite0's top-1 with each decode, and EfficientNet-Lite0 under a 3-bit budget with
# block reconstruction and learned rounding at 100, 2,000 and 20,000 steps per block, or as
# many as the time left allows (benchmarks/reconstruct_steps.py). Every figure goes to stdout
# and to $OUT/gpu_report.txt.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   DEVICE=cpu bash benchmarks/gpu_check.sh      # dry run on a CPU: tiny sizes, same steps
#
# DATA: the ImageNet sample (default ../shared/imagenet-sample); TOTAL: the seconds the whole
# script may take (default 540). Each step has its own timeout, none reaching past TOTAL; a
# step that fails or times out is reported and the next runs.
set -u
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-/tmp/gpu_check_out}"
DATA="${DATA:-../shared/imagenet-sample}"
TOTAL="${TOTAL:-540}"
mkdir -p "$OUT"
REPORT="$OUT/gpu_report.txt"
: > "$REPORT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

say() { echo "$@" | tee -a "$REPORT"; }
left() { echo $((TOTAL - SECONDS)); }  # seconds left of TOTAL (bash's SECONDS: since the start)
step() {  # step SECONDS TITLE COMMAND...: run with a timeout, output to stdout and the report
    local limit=$1 title=$2; shift 2
    [ "$limit" -gt "$(left)" ] && limit=$(left)
    if [ "$limit" -lt 10 ]; then say ""; say "=== $title: skipped, $(left) s left ==="; return; fi
    say ""; say "=== $title (timeout ${limit}s) ==="
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$REPORT"
    local code=${PIPESTATUS[0]}
    say "--- $title: exit $code in $((SECONDS - started)) s$([ "$code" = 124 ] && echo ' (TIMED OUT)')"
}

if [ "$DEVICE" = cuda ]; then
    ROWS=32000; VAL=8000; RANKS="2 4 8 16 32 64 128"; METHODS="sparse int1"
    SUB_RANKS="8"; SUB_EPOCHS=2; IMAGES=512; REPEATS=3; TRIALS=10; THREADS=()
    PYTEST_DEVICE=(-m gpu --device cuda)
    LITE0=(--steps 100 2000 20000)
else  # dry run: the same steps on tiny sizes, so the script itself is tested end to end
    ROWS=1000; VAL=250; RANKS="2 8"; METHODS="sparse"
    SUB_RANKS="2"; SUB_EPOCHS=2; IMAGES=16; REPEATS=3; TRIALS=3; THREADS=(--threads 1)
    PYTEST_DEVICE=(tests/test_batched.py -k "alone and ce")
    LITE0=(--steps 1 2 --ranks 4 --calib-images 8 --threads 2)
fi

say "gpu_check.sh, DEVICE=$DEVICE, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
step 20 "machine" bash -c 'nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python -c "import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\")"; nproc'
step 120 "tests on $DEVICE" python -m pytest -q -p no:cacheprovider "${PYTEST_DEVICE[@]}" tests/
# Today's loop is too slow for the full protocol here: compare all variants on a subset of it
# (same rows, fewer ranks and epochs), then time the batched path alone on the full protocol.
step 100 "protocol subset: loop vs engine vs batched (graphs on / off)" python -m benchmarks.bench_full_protocol \
    --device "$DEVICE" --rows "$ROWS" --val "$VAL" --methods sparse --ranks $SUB_RANKS \
    --epochs "$SUB_EPOCHS" --trials "$TRIALS" --repeats "$REPEATS" "${THREADS[@]}" \
    --variants loop engine batched batched-nographs
step 100 "full protocol, batched path (one repetition: a single run, not a median)" \
    python -m benchmarks.bench_full_protocol --device "$DEVICE" --rows "$ROWS" --val "$VAL" \
    --methods $METHODS --ranks $RANKS --trials "$TRIALS" --repeats 1 "${THREADS[@]}" \
    --variants batched
DECODES="cpu"; [ "$DEVICE" = cuda ] && DECODES="cpu gpu"
PASSES="cpu"; [ "$DEVICE" = cuda ] && PASSES="cpu gpu gpu-serial"  # gpu-serial: no read-ahead
step 60 "caching pass: decode vs bare forward" python -m benchmarks.bench_feature_extraction \
    --images "$IMAGES" --decode $PASSES --repeats "$REPEATS"
if [ -d "$DATA" ]; then
    WEIGHTS=(); [ -f weights/tf_efficientnet_lite0.safetensors ] && \
        WEIGHTS=(--weights weights/tf_efficientnet_lite0.safetensors)
    step 40 "EfficientNet-Lite0 top-1, gpu vs cpu decode" python -m benchmarks.decode_accuracy \
        --data "$DATA" --decode $DECODES "${WEIGHTS[@]}"
    if [ ${#WEIGHTS[@]} -gt 0 ]; then
        # whatever time is left, less 15 s to write the report: the script prices each run
        # from the ones before and runs fewer steps per block where the asked ones won't fit
        BUDGET=$(( $(left) - 15 ))
        step "$BUDGET" "EfficientNet-Lite0, 3-bit budget, block reconstruction + learned rounding, by steps per block" \
            python -m benchmarks.reconstruct_steps --data-dir "$DATA" "${WEIGHTS[@]}" \
            --time-limit "$((BUDGET - 10))" "${LITE0[@]}"
    else
        say ""; say "=== EfficientNet-Lite0 reconstruction: skipped, no weights/tf_efficientnet_lite0.safetensors ==="
    fi
else
    say ""; say "=== EfficientNet-Lite0: skipped, $DATA is absent ==="
fi
say ""; say "report: $REPORT ($SECONDS s in all)"
