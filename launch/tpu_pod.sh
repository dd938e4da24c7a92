#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice (e.g. v4-32: 4 hosts x 4 chips).
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--repo_dir=DIR] [--dry-run] CONFIG WORKDIR [--config.x=y ...]
#
# Runs `python -m jaxrecon.main` on all workers at once (gcloud ... ssh --worker=all). Each worker's
# jaxrecon.distributed sees a Cloud TPU VM and calls jax.distributed.initialize() with no
# arguments: jax reads the worker id, count and coordinator from the TPU metadata. WORKDIR must be
# shared by all workers (a gs:// bucket or a shared file system): checkpoints are written by every
# process together. The repository and its environment must already be at --repo_dir on each
# worker (default: ~/jaxrecon), with the venv at --venv (default: <repo_dir>/.venv).
set -euo pipefail
USAGE="$0 --tpu=NAME --zone=ZONE [--project=P] [--repo_dir=DIR] [--venv=DIR] [--dry-run] CONFIG WORKDIR [--config.x=y ...]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

TPU="" ZONE="" PROJECT="" REPO_DIR="~/jaxrecon" VENV=""
parse_option() {
  case "$1" in
    --tpu) TPU="$2" ;;
    --zone) ZONE="$2" ;;
    --project) PROJECT="$2" ;;
    --repo_dir) REPO_DIR="$2" ;;
    --venv) VENV="$2" ;;
    *) return 1 ;;
  esac
}
parse_args "$@"
[[ -n "$TPU" ]] || usage_error "--tpu=NAME is required"
[[ -n "$ZONE" ]] || usage_error "--zone=ZONE is required"
VENV="${VENV:-$REPO_DIR/.venv}"

REMOTE="cd $REPO_DIR && source $VENV/bin/activate && $(train_command)"
echo "TPU pod slice $TPU ($ZONE): every worker runs, in $REPO_DIR:"
echo "  $(train_command)"
echo "jax.distributed.initialize() (TPU auto-detection) forms one cluster of all workers; workdir: $WORKDIR"
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU" "--zone=$ZONE" --worker=all "--command=$REMOTE")
[[ -z "$PROJECT" ]] || GCLOUD+=("--project=$PROJECT")
run "${GCLOUD[@]}"
