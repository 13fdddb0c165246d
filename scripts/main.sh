#!/usr/bin/env bash
# The README's main job, on a fresh machine too: sets up what it needs on first use (scripts/setup.sh), then trains
# popup_conv4 with edge-popup (k=0.5) on Fashion-MNIST for one epoch, evaluates it on the test images and writes the
# mask artifact and its card to output/fmnist-conv4. Arguments go to train_accelerate.py (e.g. --method dense
# --output-dir output/fmnist-conv4-dense). Run again, it continues the run in its --output-dir from its last
# checkpoint (--resume latest): a finished run is not trained again, only its artifact written again; --overwrite
# starts it over.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
resume=(--resume latest)
for arg in "$@"; do
    if [ "$arg" = "--overwrite" ]; then resume=(); fi
done
exec accelerate launch train_accelerate.py --model popup_conv4 --dataset fashion-mnist --epochs 1 --batch-size 64 --output-dir output/fmnist-conv4 "${resume[@]}" "$@"
