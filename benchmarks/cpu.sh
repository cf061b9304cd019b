#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md, in one run (about 10 minutes on 2 cores; run it on an
# otherwise idle machine: every figure that matters is a ratio measured side by side).
#   bash benchmarks/cpu.sh [OUT_DIR]        (CIFAR-10 from $ROBUSTLR_DATA_DIR or ../shared/data)
set -euo pipefail
out=${1:-bench-cpu}
data=${ROBUSTLR_DATA_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
mkdir -p "$out"
cd "$out"

echo "== op: compiled cpu backend vs reference, unfold, 3x3 conv, 7x7 depthwise (batch 16)"
robustlr bench op --device cpu --batch-size 16 --repeats 5 --shapes 200x28x28 --csv op-28.csv
robustlr bench op --device cpu --batch-size 16 --repeats 3 --csv op.csv

echo "== model: training step at the embedded study's sizes (width 0.25, batch 128, small input)"
for size in 8 16; do
    robustlr bench model --archs resnet26,lrnet26 --input-size "$size" --batch-size 128 \
        --width 0.25 --small-input --device cpu --repeats 5 --csv "model-$size.csv"
done

echo "== model: training step at 32x32 (small input), batch 16"
robustlr bench model --archs resnet26,lrnet26 --input-size 32 --batch-size 16 --device cpu \
    --repeats 3 --csv model.csv

echo "== training throughput on CIFAR-10 (32x32, small input, width 1, batch 32, 8 steps)"
for arch in resnet26 lrnet26; do
    robustlr train --arch "$arch" --dataset cifar10 --data "$data/cifar10.npz" --small-input \
        --epochs 1 --batch-size 32 --out "train-$arch" --set max_steps_per_epoch=8 \
        --set val_fraction=0.004
done

echo "== adversarial training throughput, PGD-16 (digits 16x16, small input, width 0.25, 8 steps)"
for arch in resnet26 lrnet26; do
    robustlr advtrain --arch "$arch" --steps 16 --epochs 1 --out "adv-$arch" \
        --set max_steps_per_epoch=8
done

echo "== images/s per run (metrics.csv; adversarial runs count clean + adversarial images)"
for run in train-resnet26 train-lrnet26 adv-resnet26 adv-lrnet26; do
    echo "$run: $(tail -n 1 "$run/metrics.csv" | cut -d, -f6) img/s"
done
