#!/usr/bin/env bash
# CPU, float32: timm's legacy_xception in its default eager mode (the baseline), our eager
# model, our fast path (BN folded, channels_last, early stages an image at a time), the same
# compiled with freezing, and onnxruntime on our own ONNX export -- interleaved in one
# process per batch size. `xception` keeps freed memory for reuse in its process (so every
# contender gets it); the second pass leaves glibc's malloc at its defaults for all of them.
set -euo pipefail
out=${1:-benchmarks/out}
mkdir -p "$out"
echo "date: $(date -u +%F)  machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
python -c "import torch, timm, onnxruntime; print('torch', torch.__version__, 'timm', timm.__version__, 'onnxruntime', onnxruntime.__version__)"
for keep in 1 0; do
    for batch in 1 8; do
        XCEPTION_KEEP_FREED_MEMORY=$keep xception bench xception --batch-size "$batch" \
            --device cpu --no-channels-last \
            --rounds "${ROUNDS:-7}" --contender timm:legacy_xception --contender ours \
            --contender ours-fast --contender ours-compiled --contender onnxruntime \
            --json "$out/cpu_inference_b${batch}_keep$keep.json"
    done
done
# Training (forward + backward + SGD step) at 128x128, batch 16, with peak memory.
xception bench xception --mode train --batch-size 16 --image-size 128 --rounds "${ROUNDS:-7}" \
    --device cpu --no-channels-last \
    --memory --contender timm:legacy_xception --contender ours --contender ours-fast \
    --contender ours-compiled --json "$out/cpu_train_b16_128.json"
