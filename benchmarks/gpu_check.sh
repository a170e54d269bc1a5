#!/usr/bin/env bash
# The GPU check: the first thing to run on any machine with a GPU. It exercises every CUDA
# path of the package and writes its figures; all of it took about 10 minutes on one H200
# (benchmarks/RESULTS.md, session 7), four of them compiling the two training benches:
#   - the tests that need a GPU (the fused Triton kernel) and the device tests (the Triton
#     interpreter test is left to CI's CPU run);
#   - `xception train` on the built-in data set with --amp bf16, eager and with --compile;
#   - eval and predict on CUDA;
#   - fine-tuning from that run's weights with every augmentation and a frozen
#     first epoch (issue 13's paths on CUDA);
#   - `bench` for inference and training against timm's legacy_xception and inception_v3
#     (bf16, channels_last, compiled), with ours-fused in inference.
# It needs no network: PyTorch, Triton and timm must be installed; this package is
# installed here with `python3 -m pip install --no-deps -e .`, and run as `python3 -m xception`:
# on such machines `pip` and the `xception` script it installs may belong to another Python
# than the python3 that holds PyTorch.
#
#   benchmarks/gpu_check.sh [OUT [STEP...]]      (OUT default: $OUT, else benchmarks/out/gpu)
#
# Naming steps runs only those (after the install), to rerun what failed within a short
# lease: eval, predict and finetune need train-bf16's weights, so name it with them.
# OUT receives at most 8 files: summary.md (each step's exit status and time, and the bench
# tables, to copy into RESULTS.md), gpu_check.log (everything printed) and the bench JSONs.
# Steps share one deadline, so a slow step costs the later ones, never the 9.5 minutes
# (give the device call 600 s).
set -u
cd "$(dirname "$0")/.."
steps=" install gpu-tests train-bf16 eval predict finetune bench-xception-inference train-compile \
bench-xception-train bench-inception-train "
for name in "${@:2}"; do
    if [[ "$steps" != *" $name "* ]]; then
        echo "gpu_check.sh: no step '$name'; the steps:$steps" >&2
        exit 2
    fi
done
out=$(realpath -m "${1:-${OUT:-benchmarks/out/gpu}}")
only=" ${*:2} "
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 XCEPTION_CACHE="$work/cache"
log="$out/gpu_check.log"
summary="$out/summary.md"
deadline=$((SECONDS + 570))
failed=0

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/GPU: /'
    python3 -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")' 2>&1
    echo
    echo "| step | exit | seconds |"
    echo "|---|---|---|"
} > "$summary"

# selected NAME: whether this run includes the step (every step when none is named).
selected() {
    [ "$only" = "  " ] || [ "$1" = install ] || [[ "$only" == *" $1 "* ]]
}

# step NAME LIMIT COMMAND...: run with at most LIMIT seconds (less if the deadline is near).
step() {
    local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS rc
    shift 2
    selected "$name" || return 0
    if [ "$left" -lt 20 ]; then
        echo "| $name | skipped: out of time | 0 |" >> "$summary"
        failed=1
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name: $* (limit ${limit} s)" >> "$log"
    timeout "$limit" "$@" > "$work/$name.txt" 2>&1
    rc=$?
    cat "$work/$name.txt" >> "$log"
    [ "$rc" -ne 0 ] && failed=1
    echo "| $name | $rc$([ "$rc" -eq 124 ] && echo ' (timed out)') | $((SECONDS - start)) |" >> "$summary"
}

# bench NAME LIMIT ARGS...: `xception bench`, its table also in the summary.
bench() {
    local name=$1 limit=$2
    shift 2
    selected "$name" || return 0
    step "$name" "$limit" python3 -m xception bench "$@" --json "$out/$name.json"
    { echo; echo "### $name"; echo '```'; sed -n '/^contender/,$p' "$work/$name.txt"; echo '```'; } >> "$summary"
}

: > "$log"
step install 60 python3 -m pip install --no-deps --no-build-isolation -e .
step gpu-tests 120 python3 -m pytest -q -rs -k 'not interpreter' \
    tests/test_fused_separable.py tests/test_devices.py
step train-bf16 90 python3 -m xception train --device cuda --amp bf16 --max-steps 200 --workers 8 \
    --out "$work/bf16"
step eval 45 python3 -m xception eval --weights "$work/bf16/best.safetensors" --device cuda --amp bf16
step predict 30 python3 -m xception predict --weights "$work/bf16/best.safetensors" --device cuda \
    --top-k 2 "$(find "$work/cache" -path '*/val/*' -type d 2>/dev/null | sort | head -n 1)"
step finetune 75 python3 -m xception train --device cuda --amp bf16 --init-weights \
    "$work/bf16/best.safetensors" --freeze-epochs 1 \
    --auto-augment randaugment --random-erasing 0.25 --mixup 0.2 --cutmix 1.0 \
    --max-steps 60 --workers 8 --out "$work/finetune"
bench bench-xception-inference 140 xception --device cuda --amp bf16 --batch-size 256 \
    --compile --rounds 3 --contender timm:legacy_xception --contender ours-fast \
    --contender ours-compiled --contender ours-fused
step train-compile 140 python3 -m xception train --device cuda --amp bf16 --compile --max-steps 200 \
    --workers 8 --out "$work/compiled"
bench bench-xception-train 120 xception --mode train --device cuda --amp bf16 \
    --batch-size 128 --compile --rounds 3 --contender timm:legacy_xception \
    --contender ours-compiled
bench bench-inception-train 240 inception_v3 --mode train --device cuda --amp bf16 \
    --batch-size 128 --compile --rounds 3 --contender timm:inception_v3 \
    --contender ours-compiled

{ echo; grep -h "^done in" "$log" | sed 's/^/training: /'; } >> "$summary"
echo "total $SECONDS s" >> "$summary"
exit "$failed"
