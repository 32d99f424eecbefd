#!/usr/bin/env bash
# Multi-host GPU cluster, one process per host, each driving all its local GPUs.
#
# Under SLURM (coordinator, process count and id are auto-detected):
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
#       launch/gpu_multihost.sh configs/simclr_imagenet.py /shared/runs/simclr
#
# Without a scheduler, start it on every host with the same coordinator:
#   COORDINATOR=host0:12345 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#       launch/gpu_multihost.sh configs/simclr_imagenet.py /shared/runs/simclr
#
# The workdir must be on a file system every host sees (checkpoints are written
# collectively); each host reads only its own slice of the dataset.
set -euo pipefail
config=${1:?usage: launch/gpu_multihost.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/gpu_multihost.sh CONFIG WORKDIR [overrides...]}
shift 2
args=(--config="$config" --workdir="$workdir" --distributed)
if [[ -n "${COORDINATOR:-}" ]]; then
  args+=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_PROCESSES:?}"
         --process_id="${PROCESS_ID:?}")
fi
if [[ -n "${SLURM_JOB_ID:-}" && -z "${COORDINATOR:-}" ]]; then
  exec srun python -m contrastive.main "${args[@]}" "$@"
fi
exec python -m contrastive.main "${args[@]}" "$@"
