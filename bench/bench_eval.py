r"""Evaluation benchmark: affine registration, RAS and MS-SSIM cost per resolution.

Measures, per grid size: seconds per registered pair (one pair alone, and per pair when
`--pair-batch` pairs run in one vmapped call), seconds per RAS volume (one generated volume
registered to M real volumes, warped and scored: what each generated sample costs), and
3D MS-SSIM seconds per pair (both modes, batched). Registration settings are the paper-scale
defaults of config.eval (3 levels, 150/100/50 Adam steps) unless overridden. Compile time is
excluded (one warm-up call per shape) and reported apart. Appends a section to
bench/RESULTS.md.

  python bench/bench_eval.py                          # 64³ and 128³
  python bench/bench_eval.py --res 64 128 256 --num-real 4
  python bench/bench_eval.py --res 64 --iters 50 30 20

Volumes are smooth synthetic ellipsoid 'brains' with two labels; registration cost does not
depend on the content. Not part of the test suite.
"""

import argparse
import datetime
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slicevae_jax import config_lib  # noqa: E402
from slicevae_jax.eval import evaluate  # noqa: E402
from slicevae_jax.metrics import ms_ssim, ras, registration  # noqa: E402


def _volume(grid: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """An ellipsoid with an inner 'ventricle' [grid]³ in [0, 1] and its labels (0, 1, 2)."""
  c = (np.arange(grid) - grid / 2 + 0.5) / (grid / 2)
  x, y, z = np.meshgrid(c, c, c, indexing="ij")
  a = rng.uniform(0.6, 0.85, 3)
  outer = (x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2
  inner = (x / (0.3 * a[0])) ** 2 + (y / (0.4 * a[1])) ** 2 + (z / (0.3 * a[2])) ** 2
  v = np.where(outer < 1, 0.7 + 0.2 * np.cos(4 * x), 0.0)
  v = np.where(inner < 1, 0.2, v).astype(np.float32)
  labels = np.where(inner < 1, 1, np.where(outer < 1, 2, 0)).astype(np.uint8)
  return v, labels


def _timed(fn):
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t, out


def bench_resolution(res: int, reg_kwargs: dict, pair_batch: int, num_real: int,
                     msssim_batch: int) -> dict:
  rng = np.random.default_rng(res)
  n_vol = max(pair_batch, num_real, msssim_batch) + 1
  vols, labels = zip(*(_volume(res, rng) for _ in range(n_vol)))
  vols, labels = np.stack(vols), np.stack(labels)
  out = {"res": res, "pair_batch": pair_batch, "num_real": num_real}

  single = lambda: registration.register_affine(vols[0], vols[1], **reg_kwargs)
  out["compile_single_s"], _ = _timed(single)
  out["single_pair_s"], _ = _timed(single)

  mov, fix = vols[1:pair_batch + 1], np.repeat(vols[:1], pair_batch, axis=0)
  batched = lambda: registration.register_affine(mov, fix, **reg_kwargs)
  out["compile_batched_s"], _ = _timed(batched)
  t, _ = _timed(batched)
  out["batched_pair_s"] = t / pair_batch

  # One generated volume against M real ones, through the public RAS function (its chunks
  # of pair_batch pairs have the shape compiled above when M >= pair_batch).
  fixed, fixed_labels = vols[1:num_real + 1], labels[1:num_real + 1]
  ras_fn = lambda: ras.ras_from_labels(vols[:1], labels[:1], fixed, fixed_labels, 3,
                                       pair_batch=pair_batch, **reg_kwargs)["ras"]
  if num_real < pair_batch:
    _timed(ras_fn)   # a chunk shape not compiled above
  out["ras_volume_s"], out["ras_value"] = _timed(ras_fn)

  a, b = vols[:msssim_batch], vols[1:msssim_batch + 1]
  for name, kwon in (("msssim", False), ("msssim_kwon", True)):
    fn = lambda kwon=kwon: ms_ssim.ms_ssim(a, b, kwon=kwon)
    _timed(fn)
    t, _ = _timed(fn)
    out[f"{name}_pair_s"] = t / msssim_batch
  return out


def main() -> None:
  e = config_lib.base_config().eval
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--res", type=int, nargs="+", default=[64, 128])
  p.add_argument("--pair-batch", type=int, default=int(e.pair_batch))
  p.add_argument("--num-real", type=int, default=8, help="M real volumes per RAS volume")
  p.add_argument("--msssim-batch", type=int, default=int(e.msssim_batch))
  p.add_argument("--levels", type=int, default=int(e.reg_levels))
  p.add_argument("--iters", type=int, nargs="+", default=list(e.reg_iters))
  p.add_argument("--lr", type=float, default=float(e.reg_lr))
  p.add_argument("--similarity", default=str(e.similarity))
  p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  args = p.parse_args()
  e.reg_levels, e.reg_iters, e.reg_lr, e.similarity = (args.levels, tuple(args.iters), args.lr,
                                                       args.similarity)
  reg_kwargs = evaluate.registration_settings(e)

  dev = jax.devices()[0]
  rows = []
  for res in args.res:
    r = bench_resolution(res, reg_kwargs, args.pair_batch, args.num_real, args.msssim_batch)
    rows.append(r)
    print(f"{res}³ done: {r}", file=sys.stderr, flush=True)

  date = datetime.date.today().isoformat()
  cmd = "python bench/bench_eval.py " + " ".join(sys.argv[1:])
  lines = [
      f"## Evaluation (registration, RAS, MS-SSIM), {date} — {len(jax.devices())}x "
      f"{dev.device_kind} ({dev.platform}), {os.cpu_count()} CPUs, JAX {jax.__version__}",
      "",
      f"Command: `{cmd.strip()}`",
      "",
      f"Registration: {reg_kwargs['levels']} levels, {list(reg_kwargs['iters'])} Adam steps, "
      f"lr {reg_kwargs['lr']}, {reg_kwargs['similarity']}; batched = {args.pair_batch} pairs "
      f"per vmapped call; RAS volume = 1 generated volume vs M = {args.num_real} real volumes "
      f"(register + warp labels + Dice); MS-SSIM in batches of {args.msssim_batch} pairs. "
      "Timed calls follow a warm-up call of the same shape.",
      "",
      "| res | s / pair (single) | s / pair (batched) | s / RAS volume (M real) "
      "| MS-SSIM s / pair | MS-SSIM (Kwon) s / pair "
      "| first call s, compile + run (single / batched) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['res']}³ | {r['single_pair_s']:.3g} | {r['batched_pair_s']:.3g} "
                 f"| {r['ras_volume_s']:.3g} (M={r['num_real']}) | {r['msssim_pair_s']:.3g} "
                 f"| {r['msssim_kwon_pair_s']:.3g} "
                 f"| {r['compile_single_s']:.1f} / {r['compile_batched_s']:.1f} |")
  section = "\n".join(lines) + "\n"
  print(section)
  with open(args.results, "a", encoding="utf-8") as f:
    f.write("\n" + section)


if __name__ == "__main__":
  main()
