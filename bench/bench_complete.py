r"""Slice completion benchmark: the latent model's conditional mean vs interpolation.

On the held-out volumes of a trained workdir, keeps every k-th slice along the slice axis
(a thick-slice scan), fills in the others three ways and scores only the filled-in slices
against the true volume:

  slice VAE   `density.complete_volume`: the conditional mean of the missing slices'
              latents given the kept slices' codes, decoded (paper §2.1 model, or the
              workdir's latent.model).
  linear      linear interpolation along the slice axis between kept slices.
  cubic       cubic spline (not-a-knot) along the slice axis through the kept slices.
  slice VAE reconstruction (ceiling)   every true slice encoded and decoded, kept slices
              put back: what the decoder gives when the codes are exactly right, the best
              the completion can reach.

Slices past the last kept one take its value (linear, cubic). Metrics per volume, on the
missing slices only, then mean ± std over volumes: PSNR (peak 1), SSIM (dm-pix, 2D, each
missing slice, averaged), and, where the cache has labels and the workdir a RAS segmenter,
the mean Dice (labels except background) of the U-Net's segmentation of the completed
volume against the true labels; the 'original' row segments the true volume (the ceiling).

  python bench/bench_complete.py --workdir /tmp/runs/demo_copy          # k = 2 and 4
  python bench/bench_complete.py --workdir W --ks 2 4 8 --no-write

Appends a section to bench/RESULTS.md. Not part of the test suite.
"""

import argparse
import datetime
import os
import platform
import sys
import time

import dm_pix as pix
import jax
import numpy as np
import scipy.interpolate
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slicevae_jax import checkpoint as ckpt_lib  # noqa: E402
from slicevae_jax import workdir as workdir_lib  # noqa: E402
from slicevae_jax.eval import segmenter  # noqa: E402
from slicevae_jax.slicevae import density, fit_latent, inference  # noqa: E402
from slicevae_jax.slicevae import latent as lg  # noqa: E402
from slicevae_jax.data.cache import VolumeCache  # noqa: E402


def interpolate(stack: np.ndarray, observed: np.ndarray, kind: str) -> np.ndarray:
  """Missing slices of [S, H, W] from the observed ones along axis 0 ('linear' | 'cubic')."""
  s = np.arange(len(stack))
  obs = np.flatnonzero(observed)
  at = np.clip(s, obs[0], obs[-1])          # beyond the last kept slice: hold it
  if kind == "linear":
    fn = scipy.interpolate.interp1d(obs, stack[obs], axis=0)
  else:
    fn = scipy.interpolate.CubicSpline(obs, stack[obs], axis=0)
  out = np.clip(fn(at), 0.0, 1.0).astype(np.float32)
  return np.where(observed[:, None, None], stack, out)


_ssim = jax.jit(jax.vmap(lambda a, b: pix.ssim(a[..., None], b[..., None], max_val=1.0)))


def slice_metrics(got: np.ndarray, want: np.ndarray, missing: np.ndarray) -> tuple[float, float]:
  """(PSNR dB, mean SSIM) of the missing slices of stacks [S, H, W]."""
  g, w = got[missing], want[missing]
  mse = float(np.mean(np.square(g.astype(np.float64) - w)))
  return 10 * np.log10(1.0 / max(mse, 1e-12)), float(np.mean(_ssim(g, w)))


def mean_dice(pred: np.ndarray, true: np.ndarray, num_labels: int) -> float:
  """Mean Dice over labels 1..K-1 present in either map (arrays of any shape)."""
  scores = []
  for k in range(1, num_labels):
    a, b = pred == k, true == k
    total = a.sum() + b.sum()
    if total:
      scores.append(2.0 * np.logical_and(a, b).sum() / total)
  return float(np.mean(scores))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a trained workdir (a copy: nothing is written)")
  p.add_argument("--ks", type=int, nargs="+", default=[2, 4])
  p.add_argument("--num", type=int, default=0, help="held-out volumes (0 = all)")
  p.add_argument("--latent-model", default="", help="per_dim | joint | rotated (default main)")
  p.add_argument("--no-dice", action="store_true", help="skip the U-Net segmentations")
  p.add_argument("--no-write", action="store_true", help="print, do not append RESULTS.md")
  args = p.parse_args()
  logging.set_verbosity(logging.WARNING)
  t0 = time.perf_counter()
  bundle = inference.load_for_inference(args.workdir)
  config = bundle.config
  g = bundle.gaussian
  if args.latent_model and args.latent_model != g.kind:
    g = lg.load(fit_latent.latent_files(args.workdir)[args.latent_model])[0]
  cache = VolumeCache(workdir_lib.cache_dir(config, args.workdir))
  val = cache.split("val")[:args.num or None]
  axis = cache.slice_axis
  seg = None
  seg_dir = workdir_lib.checkpoint_dir(workdir_lib.segmenter_dir(args.workdir))
  if not args.no_dice and cache.labels is not None and ckpt_lib.finished_steps(seg_dir):
    seg_model, seg_vars = segmenter.load_segmenter(config, args.workdir, cache, bundle.mesh)
    num_labels = len(segmenter.label_names(cache))
    seg = lambda v: segmenter.segment_volumes(seg_model, seg_vars, v, axis, bundle.mesh)
  rows = {}
  originals = np.stack([cache.volume(i) for i in val])
  if seg is not None:
    true = np.stack([np.moveaxis(cache.label_volume(i), axis, 0) for i in val])
    seg_orig = np.moveaxis(seg(originals), axis + 1, 1)
  recon = density.decode_stacks(bundle, density.encode_volumes(bundle, originals))
  for k in args.ks:
    observed = density.keep_every(g.num_slices, k)
    missing = ~observed
    filled = {"slice VAE": [], "linear": [], "cubic": [],
              "slice VAE reconstruction (ceiling)": [
                  np.moveaxis(np.where(observed[:, None, None], np.moveaxis(o, axis, 0),
                                       np.moveaxis(r, axis, 0)), 0, axis)
                  for o, r in zip(originals, recon)]}
    for j, vol in enumerate(originals):
      stack = np.moveaxis(vol, axis, 0)
      done = density.complete_volume(bundle, vol, observed, jax.random.key(j), 0, g)
      filled["slice VAE"].append(done.mean)
      for kind in ("linear", "cubic"):
        filled[kind].append(np.moveaxis(interpolate(stack, observed, kind), 0, axis))
    for method, vols in filled.items():
      vols = np.stack(vols)
      stats = [slice_metrics(np.moveaxis(v, axis, 0), np.moveaxis(o, axis, 0), missing)
               for v, o in zip(vols, originals)]
      row = {"psnr": [s[0] for s in stats], "ssim": [s[1] for s in stats]}
      if seg is not None:
        labels = np.moveaxis(seg(vols), axis + 1, 1)
        row["dice"] = [mean_dice(l[missing], t[missing], num_labels)
                       for l, t in zip(labels, true)]
      rows[(k, method)] = row
    if seg is not None:
      rows[(k, "original (U-Net ceiling)")] = {
          "dice": [mean_dice(l[missing], t[missing], num_labels) for l, t in zip(seg_orig, true)]}
  wall = time.perf_counter() - t0
  pm = lambda v, d: f"{np.mean(v):.{d}f} ± {np.std(v):.{d}f}" if v else "—"
  lines = ["| k | method | PSNR (dB) | SSIM | Dice (U-Net) |", "|---|---|---|---|---|"]
  for (k, method), r in rows.items():
    lines.append(f"| {k} | {method} | {pm(r.get('psnr'), 2)} | {pm(r.get('ssim'), 3)} | "
                 f"{pm(r.get('dice'), 3)} |")
  cmd = " ".join(["python bench/bench_complete.py"] + sys.argv[1:])
  text = (f"\n## Slice completion vs interpolation, {datetime.date.today()} — "
          f"{platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__}\n\n"
          f"Command: `{cmd}`\n\n"
          f"Workdir: {config.name}, grid {cache.grid[0]}³, slice axis {axis}, checkpoint step "
          f"{bundle.step}, latent model {g.kind}; {len(val)} held-out volumes. Every k-th slice "
          f"kept (k − 1 of every k missing); metrics on the missing slices only, mean ± std "
          f"over volumes. Wall time {wall:.0f} s.\n\n" + "\n".join(lines) + "\n")
  print(text)
  if not args.no_write:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), "a",
              encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  main()
