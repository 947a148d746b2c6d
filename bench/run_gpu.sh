#!/usr/bin/env bash
# The GPU benchmarks in one prepared run, most important first, each stage time-boxed so that
# a slow stage cannot starve the rest. Results (Markdown sections and raw logs) go to $OUT
# (default bench/out); copy the sections into bench/RESULTS.md.
#
#   bash bench/run_gpu.sh                # everything: about 15 minutes on one H200, most of it
#                                        # compiling (20-35 s per model and resolution)
#   STAGES="slicevae eval" RES=256 bash bench/run_gpu.sh     # a part, to fit a shorter lease
#
# Stages: slicevae (float32 train / input / latent fit / sampling at 64-256, batch 128),
# dtype (bfloat16 vs float32 loss curve on the demo), torch (bench_vs_torch.py against the
# PyTorch reference), bf16 (bench_slicevae.py --dtype bfloat16), eval (registration and RAS
# cost at 64-256). Not in the default set: impl (bench_slicevae.py with conv_impl 'small', the
# CPU's convolution forms, against the slicevae stage's 'xla': does the patches form of the
# 2x2 and 4x4 layers cut the GPU's latency-bound decode at 64³ and 128³?).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
STAGES=${STAGES:-"slicevae dtype torch bf16 eval"}
RES=${RES:-"64 128 256"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$OUT/gpu.txt" 2>&1 || true
$PY -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1

stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name ($(date +%T), limit ${secs}s): $*" | tee -a "$OUT/log.txt"
  timeout "$secs" "$@" >> "$OUT/log.txt" 2>&1
  echo "== $name exit $? ($(date +%T))" | tee -a "$OUT/log.txt"
}

R="$OUT/RESULTS_gpu.md"
stage slicevae 300 $PY bench/bench_slicevae.py --res $RES --batch 128 --steps 20 \
  --latent-volumes 100 --sample-volumes 4 --cache-volumes 4 --out "$R"
stage dtype 200 $PY bench/bench_dtype.py --steps 800 --append --out "$R" \
  --json "$OUT/dtype_curves.json"
stage torch 420 $PY bench/bench_vs_torch.py --device gpu --res $RES --batch 32 128 \
  --rounds 2 --steps 20 --jax-cache /tmp/jax_cache --append --out "$R"
stage bf16 200 $PY bench/bench_slicevae.py --res $RES --batch 128 --steps 20 \
  --latent-volumes 50 --sample-volumes 2 --cache-volumes 2 --dtype bfloat16 --out "$R"
stage impl 200 $PY bench/bench_slicevae.py --res $RES --batch 128 --steps 20 \
  --latent-volumes 20 --sample-volumes 4 --cache-volumes 2 --conv-impl small --out "$R"
stage eval 150 $PY bench/bench_eval.py --res $RES --num-real 4 --pair-batch 4 --cost \
  --results "$R"
echo "done $(date +%T)" | tee -a "$OUT/log.txt"
