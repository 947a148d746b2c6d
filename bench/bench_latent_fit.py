r"""Latent model fit (`latent_gaussian.fit`, every `latent.model`): wall time and peak host memory.

Fits each latent model to random encoded stacks of the real shapes, N = 400
training volumes of S = grid slices with L = 1024 latent entries each, at the
paper's rank for that grid (configs/hcpXX.py: 64 at 64³ and 256³, 128 at 128³).
Each (grid, model) runs in its own process, so the peak resident memory that
process reports (resource.getrusage(RUSAGE_SELF).ru_maxrss at its end) is that
fit's own, together with the N·S·L float32 input it was given (0.4 GB at 256³;
the "data" column is the peak before the fit, i.e. the input plus JAX's
runtime). The fit time is the first call, compile included, as in `fit_latent`.

  python bench/bench_latent_fit.py                         # 64³ 128³ 256³, all models
  python bench/bench_latent_fit.py --res 64 --models joint
  python bench/bench_latent_fit.py --append                # adds a section to RESULTS.md

Random data has a flat spectrum, which costs the SVDs what real codes do. The
budget is 4 GB peak host memory per fit at 256³. Not part of the test suite.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VOLUMES, LATENT_DIM = 400, 1024
BUDGET_GIB = 4.0 * 1e9 / 2 ** 30                              # 4 GB

WORKER = r"""
import json, resource, sys, time
import jax, numpy as np
sys.path.insert(0, {root!r})
from slicevae_jax.slicevae import latent as lg
maxrss_gib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
y = np.random.default_rng(0).standard_normal(({n}, {s}, {l}), dtype=np.float32)
before = maxrss_gib()
t = time.perf_counter()
g = lg.fit(y, {rank}, model={model!r})
jax.block_until_ready(g)
fit_s = time.perf_counter() - t
print(json.dumps(dict(fit_s=fit_s, rank=g.rank, data_gib=before, peak_gib=maxrss_gib(),
                      backend=jax.default_backend(), jax=jax.__version__)))
"""


def run_case(res: int, model: str, rank: int) -> dict:
  """Fits one (grid, model) in a fresh process and returns what it printed."""
  code = WORKER.format(root=ROOT, n=NUM_VOLUMES, s=res, l=LATENT_DIM, rank=rank, model=model)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{res}³ {model} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--res", type=int, nargs="*", default=[64, 128, 256])
  p.add_argument("--models", nargs="*", default=["per_dim", "joint", "rotated"])
  p.add_argument("--append", action="store_true", help="append a section to --out")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  a = p.parse_args()
  sys.path.insert(0, ROOT)
  from slicevae_jax import config_lib  # pylint: disable=import-outside-toplevel

  lines = ["| res | model | N, S, L | rank asked / kept | fit s | data GiB | peak GiB |",
           "|---|---|---|---|---|---|---|"]
  info, over = {}, []
  load_before = os.getloadavg()[0]
  for res in a.res:
    hcp = config_lib.load_module(os.path.join(ROOT, "configs", f"hcp{res}.py")).get_config()
    rank = hcp.latent.rank
    for model in a.models:
      r = run_case(res, model, rank)
      info = r
      lines.append(f"| {res}³ | {model} | {NUM_VOLUMES}, {res}, {LATENT_DIM} | "
                   f"{rank} / {r['rank']} | {r['fit_s']:.1f} | {r['data_gib']:.2f} | "
                   f"{r['peak_gib']:.2f} |")
      print(lines[-1], flush=True)
      if r["peak_gib"] > BUDGET_GIB:
        over.append(f"{res}³ {model}")
  if over:
    print(f"over the 4 GB budget: {', '.join(over)}", flush=True)
  if not a.append:
    return
  section = [
      f"\n## Latent model fit: time and peak host memory, {datetime.date.today()} — "
      f"{info.get('backend', '?')}, {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPUs, JAX {info.get('jax', '?')}",
      "",
      f"Command: `{' '.join(['python bench/bench_latent_fit.py'] + sys.argv[1:])}`",
      "",
      "`latent_gaussian.fit` on random float32 stacks [N, S, L], one process per row; fit s is "
      "the first call (compile included); data GiB is the process's peak before the fit (the "
      "input and the JAX runtime), peak GiB its peak RSS (ru_maxrss) after it. Load average "
      f"(1 min) {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the run: other work "
      "on a shared machine slows XLA's thread pool most, so read the times as upper bounds.",
      "",
      *lines,
  ]
  if over:
    section += ["", f"Over the 4 GB budget: {', '.join(over)}."]
  with open(a.out, "a", encoding="utf-8") as f:
    f.write("\n".join(section) + "\n")


if __name__ == "__main__":
  main()
