r"""Quality versus training budget: the main job at several step counts, every latent model.

For each budget (training steps of the slice VAE) this runs the whole pipeline of a config in
its own workdir — train, fit every latent model, sample, evaluate — and collects, per budget
and per row of the evaluation (the configured latent model's samples, each other latent model
fitted on the same checkpoint, the held-out reconstructions) the sample MS-SSIM, the RAS, the
Kwon and Gaussian MMD and, for the reconstructions, their MSE and PSNR; the real row (real-pair
MS-SSIM and the real-vs-real RAS) is printed beside. One cache and one RAS segmenter serve every
budget (the segmenter is trained in the first workdir and copied, or taken from --segmenter, a
workdir whose segmenter/ is trained), so the rows differ only by the slice VAE's budget. Appends
a table to bench/RESULTS.md, with the training time each budget logged (metrics.jsonl).

  python bench/bench_quality.py                                # configs/demo.py, 3 budgets
  python bench/bench_quality.py --steps 400 800 1600 3200 --workdir /tmp/quality
  python bench/bench_quality.py --config configs/demo.py:long --steps 2000 4000 \
      --segmenter runs/demo_long

A budget's workdir is kept: running the command again resumes or reuses what is done. This is a
benchmark (tens of minutes to hours on a CPU), not a test.
"""

import argparse
import datetime
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from slicevae_jax import bundle  # noqa: E402
from slicevae_jax import config_lib  # noqa: E402
from slicevae_jax import fileio  # noqa: E402
from slicevae_jax import pipeline  # noqa: E402
from slicevae_jax import workdir as workdir_lib  # noqa: E402


def load_config(spec: str):
  """configs/x.py[:arg] -> ConfigDict, as --config does."""
  path, _, arg = spec.partition(":")
  return config_lib.load_module(path).get_config(arg or None)


def run_budget(spec: str, steps: int, workdir: str, cache_dir: str, segmenter_from: str | None
               ) -> tuple[dict, float, float | None]:
  config = load_config(spec)
  config.train.num_steps = int(steps)
  config.train.progress = False
  config.segmenter.progress = False
  config.data.cache_dir = cache_dir
  os.makedirs(workdir, exist_ok=True)
  if segmenter_from and not os.path.exists(workdir_lib.segmenter_dir(workdir)):
    shutil.copytree(workdir_lib.segmenter_dir(segmenter_from), workdir_lib.segmenter_dir(workdir))
  t0 = time.perf_counter()
  pipeline.run(config, workdir, "all")
  metrics = os.path.join(workdir_lib.eval_dir(workdir), workdir_lib.METRICS_FILE)
  return (fileio.read_json(metrics), time.perf_counter() - t0,
          bundle.training_minutes(workdir, config))


def _f(v, fmt=".3f"):
  return "—" if v is None else format(v, fmt)


def table(results: list[tuple[int, dict, float, float | None]]) -> str:
  head = ("| steps | row | MS-SSIM (real pairs) | RAS ↑ (real vs real) | Kwon MMD ↓ "
          "| Gaussian MMD ↓ | recon MSE | recon PSNR dB | train min | wall s |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for steps, metrics, wall, train_min in results:
    real = metrics["real"]
    for row in metrics.get("rows", [metrics["model"]]):
      rec = row.get("reconstruction") or {}
      lines.append(
          f"| {steps} | {row['name']} "
          f"| {_f(row.get('ms_ssim', {}).get('mean'))} ({_f(real.get('ms_ssim', {}).get('mean'))}) "
          f"| {_f(row.get('ras', {}).get('mean'))} ({_f(real.get('ras', {}).get('mean'))}) "
          f"| {_f(row.get('mmd_kwon', {}).get('mean'), '.1f')} "
          f"| {_f(row.get('mmd_gaussian', {}).get('value'), '.4f')} "
          f"| {_f(rec.get('mse'), '.5f')} | {_f(rec.get('psnr'), '.2f')} "
          f"| {_f(train_min, '.1f')} | {wall:.0f} |")
  return head + "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--steps", type=int, nargs="+", default=[400, 1000, 2000])
  parser.add_argument("--workdir", default="/tmp/slicevae_quality")
  parser.add_argument("--segmenter", default=None,
                      help="a workdir whose trained segmenter/ every budget uses")
  parser.add_argument("--no-write", action="store_true", help="print, do not append RESULTS.md")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  cache_dir = os.path.join(args.workdir, "cache")
  results, first = [], args.segmenter
  for steps in args.steps:
    wd = os.path.join(args.workdir, f"steps_{steps}")
    metrics, wall, train_min = run_budget(args.config, steps, wd, cache_dir, first)
    first = first or wd
    results.append((steps, metrics, wall, train_min))
    print(table(results[-1:]), flush=True)
  text = (f"\n## Quality versus training budget, {datetime.date.today()} — "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n\n"
          f"Command: `python bench/bench_quality.py --config {args.config} --steps "
          f"{' '.join(map(str, args.steps))}"
          f"{' --segmenter ' + args.segmenter if args.segmenter else ''}`\n\n"
          "Per budget, every row of the evaluation: the configured latent model's samples, the "
          "other latent models on the same checkpoint, the held-out reconstructions. In "
          "brackets: the real row (real-pair MS-SSIM, real-vs-real RAS); a sample set is as "
          "diverse as the real one when its MS-SSIM is close to the real pairs'. Train min: "
          "the slice VAE's training time from its logged throughput; wall s: this command's "
          "time for the budget (only what was not done yet: a budget trained earlier is only "
          "evaluated).\n\n" + table(results))
  print(text)
  if not args.no_write:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), "a",
              encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main()
