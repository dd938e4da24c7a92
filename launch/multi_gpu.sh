#!/usr/bin/env bash
# Train on every GPU of one host.
#
#   launch/multi_gpu.sh [--gpus=0,1,2,3] [--dry-run] CONFIG WORKDIR [--config.x=y ...]
#
# One process drives all local GPUs: the batch is sharded over a ('data',) mesh of every visible
# device, so no jax.distributed set-up is needed (--distributed=off makes sure a surrounding Slurm
# allocation is not mistaken for a multi-process job). --gpus restricts the visible GPUs
# (CUDA_VISIBLE_DEVICES). config.batch_size must be divisible by the number of GPUs.
set -euo pipefail
USAGE="$0 [--gpus=LIST] [--dry-run] CONFIG WORKDIR [--config.x=y ...]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

GPUS=""
parse_option() {
  case "$1" in
    --gpus) GPUS="$2" ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
EXTRA+=(--distributed=off)

if [[ -n "$GPUS" ]]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
  echo "Single host, GPUs $GPUS (CUDA_VISIBLE_DEVICES), one process; workdir: $WORKDIR"
else
  echo "Single host, every visible GPU, one process; workdir: $WORKDIR"
fi
train_args
run "${TRAIN[@]}"
