#!/usr/bin/env bash
# Every GPU figure of docs/performance.md ("On a GPU"), from the repository root
# of a GPU host with jax[cuda], flax, optax, orbax and torch (no TensorFlow):
#
#   bash benchmarks/gpu_session.sh OUT_DIR [PART ...]
#
# The parts run in this order, the headline figure first. Each has a time limit
# in seconds (the variable beside it), after which it is stopped and the next part
# starts, so that a command limited to 10 minutes still returns the first figures:
#
#   step_r50    R50_SECONDS=400         SimCLR ResNet-50 224 px, batch 128, float32
#               and bfloat16, synthetic input, against PyTorch (AMP bf16,
#               channels_last, torch.compile), and the top ops of 3 traced steps
#   step_cifar  CIFAR_STEP_SECONDS=180  ResNet-18 CIFAR-10, batch 512, float32 and
#               bfloat16, synthetic and in-memory input (prefetch 2), against PyTorch
#   cost        COST_SECONDS=300        ResNet-50 bf16: SimCLR against MoCo at batch
#               256; SimCLR at batch 1024 (4096 over 4 GPUs) without and with remat
#   cifar_run   CIFAR_SECONDS=240       full-width CIFAR-10 SimCLR for that long:
#               images/s per log line and kNN every epoch
#
# step_r50 uses batch 128 (SimCLR's 4096 over 32 GPUs): at 256 the float32 step
# keeps about 68 GB of activations (`python -m benchmarks.cost ... --activations_only`),
# near all an H100 holds. Any step row or cost row that runs out of memory says
# OOM, and the other rows go on.
#
# With no PART all four run (18 minutes at most). On a GPU lent for 15 minutes in
# commands of at most 10: `bash benchmarks/gpu_session.sh $OUT step_r50 step_cifar`
# (at most 580 s), then at once, while the machine is warm,
# `CIFAR_SECONDS=150 bash benchmarks/gpu_session.sh $OUT cifar_run`; cost in
# another lease. The limits are estimates for an H100/H200 (JAX and torch.compile
# compilation included), not measurements. PyTorch runs first (JAX then holds most
# of the GPU's memory) and each of its runs gets --torch_seconds, half of it for
# torch.compile, after which eager mode is timed: the JAX rows keep the rest of
# their part's time. Every figure is printed, to session.log too, as it is measured.
#
# OUT_DIR gets session.log (everything the parts print, appended), one JSON per
# step and cost part and cifar_run.jsonl (the run's metrics): five files.
#
# ml_collections is installed from .whl/ when the host lacks it (on a machine with
# network, beforehand: `pip download --no-deps -d .whl ml_collections`). step_cifar
# and cifar_run read the CIFAR-10 JPEG tarball at $CIFAR_TARBALL (default
# .gpudata/cifar10-train-jpeg.tar.gz).
#
# SMOKE=1 runs every part at toy sizes (width 0.25, small images and batches, one
# step, a 90-second run on 300 images): a check on any machine, a CPU included,
# that the script and its Python run end to end. Its figures measure nothing.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR [step_r50|step_cifar|cost|cifar_run ...]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(step_r50 step_cifar cost cifar_run)
for part in "${parts[@]}"; do
  case $part in
    step_r50|step_cifar|cost|cifar_run) ;;
    *) echo "gpu_session.sh: unknown part '$part' (step_r50, step_cifar, cost, cifar_run)" >&2
       exit 2 ;;
  esac
done
mkdir -p "$out" || exit
log=$out/session.log
tarball=${CIFAR_TARBALL:-.gpudata/cifar10-train-jpeg.tar.gz}

if ! python3 -c 'import ml_collections' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# JAX takes 75% of the GPU by default; PyTorch has finished before JAX starts.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

if [ "${SMOKE:-0}" = 1 ]; then
  step_small=(--config.model.width=0.25 --steps=1 --warmup=1 --rounds=1)
  r50_small=(--config.data.image_size=64 --config.global_batch_size=16 --profile_steps=1)
  cifar_small=(--config.global_batch_size=32)
  cost_small=(--config.model.width=0.25 --config.data.image_size=64 --batch=16
              --large_batch=32 --steps=1)
  run_small=(--config.model.width=0.25 --config.global_batch_size=64
             --config.data.holdout_per_class=10 --config.log_every_steps=2)
  CIFAR_SECONDS=${CIFAR_SECONDS:-90}
else
  step_small=() r50_small=() cifar_small=() cost_small=() run_small=()
fi

# A CIFAR-10 JPEG folder for the parts that read real images, unpacked once; for
# SMOKE=1, 30 images of each class, so that its run reaches a kNN epoch.
cifar_folder() {
  local data=/tmp/gpu_data
  if [ ! -d "$data/cifar10/train" ]; then
    [ -f "$tarball" ] || { echo "gpu_session.sh: no CIFAR-10 tarball at $tarball" >&2; return 1; }
    mkdir -p "$data" && tar xzf "$tarball" -C "$data" || return 1
  fi
  if [ "${SMOKE:-0}" != 1 ]; then
    echo "$data/cifar10/train"
    return
  fi
  local class
  for class in "$data"/cifar10/train/*/; do
    mkdir -p "$data/smoke/$(basename "$class")"
    find "$class" -name '*.jpg' | sort | head -30 |
        xargs -I{} ln -sf {} "$data/smoke/$(basename "$class")/"
  done
  echo "$data/smoke"
}

# run_part NAME SECONDS COMMAND...: the command under its time limit, its output
# shown and appended to the log; a part that fails or runs out of time is logged
# and the next one runs.
run_part() {
  local name=$1 seconds=$2 start=$SECONDS status
  shift 2
  echo "=== $name (at most $seconds s): $*" | tee -a "$log"
  timeout --kill-after=30 "$seconds" "$@" 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
  echo "=== $name: exit status $status after $((SECONDS - start)) s" \
       "$([ "$status" = 124 ] && echo '(its time limit)')" | tee -a "$log"
}

for part in "${parts[@]}"; do
  case $part in
    step_r50)
      run_part step_r50 "${R50_SECONDS:-400}" python3 -m benchmarks.step \
          --config=configs/simclr_imagenet.py --config.global_batch_size=128 \
          --precisions=float32,bfloat16 --inputs=synthetic --torch --torch_seconds=130 \
          --steps=10 --rounds=3 --profile_steps=3 --json="$out/step_r50.json" "${step_small[@]}" "${r50_small[@]}" ;;
    step_cifar)
      folder=$(cifar_folder) || continue
      run_part step_cifar "${CIFAR_STEP_SECONDS:-180}" python3 -m benchmarks.step \
          --config=configs/simclr_cifar10.py --config.global_batch_size=512 \
          --config.data.source=folder "--config.data.path=$folder" \
          --precisions=float32,bfloat16 --inputs=synthetic,in_memory --prefetch=2 \
          --torch --torch_seconds=70 --steps=10 --rounds=3 --json="$out/step_cifar.json" "${step_small[@]}" "${cifar_small[@]}" ;;
    cost)
      run_part cost "${COST_SECONDS:-300}" python3 -m benchmarks.cost \
          --config=configs/simclr_imagenet.py --config.model.precision=bfloat16 \
          --large_batch=1024 --run_large --json="$out/cost.json" "${cost_small[@]}" ;;
    cifar_run)
      folder=$(cifar_folder) || continue
      workdir=/tmp/gpu_cifar_run
      run_part cifar_run "${CIFAR_SECONDS:-240}" python3 -m contrastive.main \
          --config=configs/simclr_cifar10.py --workdir=$workdir \
          --config.data.source=folder "--config.data.path=$folder" \
          --config.data.holdout_per_class=500 --config.eval.knn_every_epochs=1 \
          --config.eval.enabled=False "${run_small[@]}"
      cp "$workdir/metrics.jsonl" "$out/cifar_run.jsonl" 2>/dev/null ;;
  esac
done
