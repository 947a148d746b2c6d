r"""bfloat16 against float32 compute (`model.dtype`): the demo's loss curve and wall time.

Trains the slice VAE of configs/demo.py (the embedded default data set, 64³) once per
compute dtype, each in its own subprocess and workdir (`--mode=train`, same seed, so the same
initial parameters and the same batches), then lines up the two training logs: training loss
(a moving mean over the logged steps), validation loss, and the training throughput the
trainer logs. Parameters, Adam moments and the loss stay float32 in both runs; bfloat16 only
changes the activations and the convolution inputs (slice_vae.py).

  python bench/bench_dtype.py                            # 800 steps, the demo's budget
  python bench/bench_dtype.py --steps 2000 --append      # longer; appends to RESULTS.md

The speed of one training step per dtype at 64/128/256 is bench_slicevae.py's
`--dtype bfloat16`; this script answers whether the cheaper arithmetic learns the same model.
Not part of the test suite.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
DTYPES = ("float32", "bfloat16")


def _train(workdir: str, dtype: str, steps: int, cache: str) -> float:
  """One `--mode=train` run; returns its wall seconds (data synthesis included the first time:
  both runs share one cache of the synthesised subjects)."""
  cmd = [sys.executable, "-m", "slicevae_jax.main", f"--config={ROOT}/configs/demo.py",
         f"--workdir={workdir}", "--mode=train", f"--config.model.dtype={dtype}",
         f"--config.train.num_steps={steps}", "--config.train.progress=False",
         f"--config.data.cache_dir={cache}"]
  # The child sees this interpreter's packages even where sys.executable is not the venv's.
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in sys.path if p]))
  t = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True, env=env)
  return time.perf_counter() - t


def _records(workdir: str) -> list[dict]:
  """The slice VAE's training log (metrics.jsonl in the workdir)."""
  from slicevae_jax import metric_writer  # pylint: disable=import-outside-toplevel
  records = metric_writer.read_metrics(workdir)
  if not records:
    raise FileNotFoundError(f"no training log in {workdir}")
  return records


def _series(records: list[dict], key: str) -> dict[int, float]:
  return {int(r["step"]): float(r[key]) for r in records if key in r and "step" in r}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--workdir", default=None, help="default: a temporary folder")
  p.add_argument("--append", action="store_true", help="add the section to bench/RESULTS.md")
  p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
  p.add_argument("--json", default=None, help="also write the curves here")
  a = p.parse_args()
  base = a.workdir or tempfile.mkdtemp(prefix="bench_dtype_")
  walls, logs = {}, {}
  for dtype in DTYPES:
    wd = os.path.join(base, dtype)
    walls[dtype] = _train(wd, dtype, a.steps, os.path.join(base, "cache"))
    logs[dtype] = _records(wd)
  loss = {d: _series(logs[d], "loss") for d in DTYPES}
  val = {d: _series(logs[d], "val_loss") for d in DTYPES}
  rate = {d: _series(logs[d], "slices_per_sec") for d in DTYPES}
  steps = sorted(set(loss["float32"]) & set(loss["bfloat16"]))
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  lines = [
      f"\n## bfloat16 against float32 on the demo, {datetime.date.today()} — "
      f"{dev.device_kind} ({dev.platform}), JAX {jax.__version__}",
      "",
      f"Command: `python bench/bench_dtype.py {' '.join(sys.argv[1:])}`".rstrip(),
      "",
      "configs/demo.py, `--mode=train`, same seed (same initial parameters and batches); "
      "training loss as logged (mean over the logging window), validation loss on the "
      "fixed held-out slices.",
      "",
      "| step | float32 loss | bfloat16 loss | ratio | float32 val | bfloat16 val |",
      "|---|---|---|---|---|---|",
  ]
  for s in steps:
    f32, b16 = loss["float32"][s], loss["bfloat16"][s]
    v32, v16 = val["float32"].get(s), val["bfloat16"].get(s)
    fmt = lambda v: "" if v is None else f"{v:.1f}"
    lines.append(f"| {s} | {f32:.1f} | {b16:.1f} | {b16 / f32:.3f} | {fmt(v32)} | {fmt(v16)} |")
  med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")
  lines += ["", "| dtype | wall s (compile, train, eval; float32 also synthesises the data) | median slices/s logged |",
            "|---|---|---|"]
  for d in DTYPES:
    lines.append(f"| {d} | {walls[d]:.0f} | {med(list(rate[d].values())):.0f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if a.json:
    with open(a.json, "w", encoding="utf-8") as f:
      json.dump({"loss": loss, "val_loss": val, "slices_per_sec": rate, "wall_s": walls}, f)
  if a.append:
    with open(a.out, "a", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main()
