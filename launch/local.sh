#!/usr/bin/env bash
# One host: every local device (CPU cores, GPUs, or a single TPU VM) in one process.
#
#   launch/local.sh configs/simclr_cifar10.py /tmp/simclr_cifar10 [--config.field=value ...]
#
# Restarting the same command resumes from the workdir's latest checkpoint.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
exec python -m contrastive.main --config="$config" --workdir="$workdir" "$@"
