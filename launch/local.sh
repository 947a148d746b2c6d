#!/usr/bin/env bash
# Runs N JAX processes of the main job on this machine, as a multi-host run would.
#
# For testing multi-process code without a cluster: each process gets its own
# CPU devices (or, on a multi-GPU box, one GPU each via CUDA_VISIBLE_DEVICES)
# and they form one mesh through jax.distributed on 127.0.0.1.
#
# Usage: launch/local.sh NUM_PROCESSES CONFIG WORKDIR [extra main.py flags...]
#   e.g. launch/local.sh 2 configs/demo.py:smoke runs/mp --config.train.num_steps=8
# Environment:
#   PORT               coordinator port (default 12355)
#   DEVICES_PER_PROC   forced CPU devices per process on a CPU-only machine (default 1)
#   GPUS_PER_PROC      if set, process i sees GPUs [i*G, (i+1)*G) (CUDA_VISIBLE_DEVICES)
#   PYTHON             interpreter (default python)
# Build the cache first (--mode=preprocess) when the data set is real: multi-host
# runs read an existing cache. Logs of process i go to WORKDIR/launch_i.log.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n '2,18p' "$0"; exit 2; fi
n=$1; config=$2; workdir=$3; shift 3
port=${PORT:-12355}
py=${PYTHON:-python}
mkdir -p "$workdir"
pids=()
for ((i = 0; i < n; i++)); do
  env_extra=()
  if [ -n "${GPUS_PER_PROC:-}" ]; then
    first=$((i * GPUS_PER_PROC))
    ids=$(seq -s, "$first" $((first + GPUS_PER_PROC - 1)))
    env_extra+=("CUDA_VISIBLE_DEVICES=$ids")
  else
    env_extra+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES_PER_PROC:-1}")
  fi
  env "${env_extra[@]}" "$py" -m slicevae_jax.main --config="$config" --workdir="$workdir" \
    --config.dist.initialize=True --config.dist.coordinator_address="127.0.0.1:$port" \
    --config.dist.num_processes="$n" --config.dist.process_id="$i" "$@" \
    >"$workdir/launch_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $workdir/launch_$i.log" >&2
    status=1
  fi
done
exit $status
