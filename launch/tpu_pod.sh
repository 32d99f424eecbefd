#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every TPU VM worker, one process each.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b \
#       launch/tpu_pod.sh configs/simclr_imagenet.py gs://bucket/runs/simclr \
#       --config.data.data_dir=gs://bucket/tensorflow_datasets
#
# The repository must already be on every worker (e.g. cloned into ~/contrastive
# and installed with `pip install -e .[tpu]`). jax.distributed.initialize()
# finds the pod's coordinator itself; the workdir should be a GCS path.
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command \
  "cd ~/contrastive && python -m contrastive.main --config=$config --workdir=$workdir --distributed$overrides"
