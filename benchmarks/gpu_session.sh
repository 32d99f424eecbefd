#!/usr/bin/env bash
# Every GPU figure of the README's Performance section, in one command, from the
# repository root of a GPU host with jax[cuda], flax, optax, orbax and torch:
#
#   bash benchmarks/gpu_session.sh OUT_DIR [CIFAR_TARBALL]
#
# ml_collections is installed from .whl/ when the host lacks it (a host without
# network: `pip download --no-deps -d .whl ml_collections` beforehand). The CIFAR-10
# JPEG tarball (default .gpudata/cifar10-train-jpeg.tar.gz) feeds the in-memory
# input path and the full-width CIFAR run; TensorFlow is not needed.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [CIFAR_TARBALL]}
tarball=${2:-.gpudata/cifar10-train-jpeg.tar.gz}
mkdir -p "$out"
if ! python3 -c 'import ml_collections' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
data=/tmp/gpu_data
mkdir -p "$data" && tar xzf "$tarball" -C "$data"
cifar=(--config.data.source=folder "--config.data.path=$data/cifar10/train")

# 1. SimCLR ResNet-18 CIFAR and ResNet-50 224 px, fp32 and bf16, against PyTorch.
python3 -m benchmarks.step --config=configs/simclr_cifar10.py \
    --config.global_batch_size=512 --precisions=float32,bfloat16 \
    --inputs=synthetic,in_memory "${cifar[@]}" --torch --steps=10 --rounds=3 \
    --json="$out/step_cifar.json" 2>&1 | tee "$out/step_cifar.txt"
python3 -m benchmarks.step --config=configs/simclr_imagenet.py \
    --config.global_batch_size=256 --precisions=float32,bfloat16 \
    --inputs=synthetic --torch --steps=10 --rounds=3 \
    --json="$out/step_r50.json" 2>&1 | tee "$out/step_r50.txt"

# 2. End-to-end against MoCo at 256, SimCLR at 4096 with and without remat.
python3 -m benchmarks.cost --config=configs/simclr_imagenet.py \
    --config.model.precision=bfloat16 --run_large \
    --json="$out/cost.json" 2>&1 | tee "$out/cost.txt"

# 3. Full-width CIFAR-10 SimCLR for as long as the budget allows: images/s per
#    log line and kNN every epoch in metrics.jsonl.
timeout "${CIFAR_SECONDS:-240}" python3 -m contrastive.main --config=configs/simclr_cifar10.py \
    --workdir=/tmp/gpu_cifar_run "${cifar[@]}" --config.data.holdout_per_class=500 \
    --config.eval.knn_every_epochs=1 --config.eval.enabled=False \
    2>&1 | tee "$out/cifar_run.txt" || true
cp /tmp/gpu_cifar_run/metrics.jsonl "$out/cifar_metrics.jsonl" 2>/dev/null || true
