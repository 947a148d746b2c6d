r"""Evaluation stage: generated volumes + held-out real volumes -> metrics.json + report.md.

Last step of the data flow (sample -> evaluate; paper §2.2, §4; DESIGN §4). One code path
scores our samples and any other model's:

* `evaluate_volumes` — arrays in, metrics and pictures out: Kwon MMD (mean ± std), the
  normalised Gaussian-kernel MMD, 3D MS-SSIM diversity of the generated set and of the real
  set (correct and Kwon modes), the Realistic Atlas Score against the real set with the
  real-vs-real upper bound, and the segmenter Fréchet distance.
* `evaluate_workdir` — a trained workdir: `<workdir>/samples/*.nii.gz` against the cache's
  'val' split, with the RAS segmenter trained (or resumed) in `<workdir>/segmenter/` if
  needed; writes `<workdir>/eval/`.
* `evaluate_folders` — folders of NIfTI files (e.g. another model's samples) against a folder
  of real volumes and a folder of their label maps, with the segmenter of an existing workdir.
  Also a command line:

    python -m slicevae_jax.evaluate --config=configs/hcp64.py --generated=DIR --real=DIR \
        --labels=DIR --segmenter_workdir=runs/hcp64 --out=DIR [--name=alpha-wgan]

* `write_report` — the Markdown report for one or several models (Table 1 layout, a Fig. 4
  RAS bar chart with the real-vs-real upper bound, Fig. 3 segmentation overlays, montages).

Which real volumes: the RAS and the MMD compare against the held-out set (at most
`eval.num_real` volumes), as the paper's RAS does. For the upper bound and the real rows of
the Gaussian MMD and the Fréchet distance, the real set is cut into two disjoint halves
(first half, second half); those real-vs-real values come from half as many volumes and so
carry more finite-sample bias than the generated-vs-real ones.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import config_lib
from slicevae_jax import density_stages
from slicevae_jax import fileio
from slicevae_jax import fit_latent as fit_latent_lib
from slicevae_jax import inference
from slicevae_jax import latent_gaussian as lg
from slicevae_jax import parallel
from slicevae_jax import staleness
from slicevae_jax import segmenter as seg_lib
from slicevae_jax import trainer
from slicevae_jax import viz
from slicevae_jax.data import nifti
from slicevae_jax.data.cache import VolumeCache, to_stack
from slicevae_jax.errors import DataError
from slicevae_jax.metrics import frechet, mmd, ms_ssim, ras

EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"
REAL_ROW_FILE = "real_row.json"
RECON_NAME = "reconstructions of held-out volumes"
REAL_DICE_FILE = "real_row_dice.npz"
REPORT_FILE = "report.md"
RAS_CHART = "ras_per_label.png"
SAMPLES_DIR = "samples"      # where the sample stage writes (sample.SAMPLES_DIR)
MIN_MS_SSIM_SIZE = 2 ** len(ms_ssim.MS_SSIM_WEIGHTS)
# Values of other models' volumes this far outside [0, 1] trigger the min/max rescaling.
RANGE_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------
# Settings.


def _check_eval_config(e: ml_collections.ConfigDict) -> dict[str, Any]:
  """Registration kwargs from config.eval, after checking the values the code cannot take."""
  config_lib.check_eval(e)
  return ras.registration_settings(e)


def _first(volumes: np.ndarray, limit: int) -> np.ndarray:
  """The first `limit` volumes (all when limit is 0)."""
  return volumes[:limit] if limit else volumes


def _stats(d: dict[str, Any], **extra: Any) -> dict[str, Any]:
  """mean/std as floats; NaN (Kwon-mode MS-SSIM of anti-correlated pairs) -> None for JSON."""
  return {"mean": _finite_or_none(d["mean"]), "std": _finite_or_none(d["std"]), **extra}


def _label_dict(names: list[str], values: np.ndarray) -> dict[str, float | None]:
  """Per-label values without background, NaN -> None (JSON has no NaN)."""
  return {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names[1:], values[1:])}


def _finite_or_none(v: float) -> float | None:
  return float(v) if np.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# Metrics on arrays.


def _segment_fn(model: Any, variables: Any, slice_axis: int, mesh: Any, batch: int):
  def segment(vols: np.ndarray) -> np.ndarray:
    return seg_lib.segment_volumes(model, variables, vols, slice_axis, mesh, batch=batch)
  return segment


def _prepare_real(config: ml_collections.ConfigDict, real: Any, real_labels: Any,
                  num_labels: int) -> tuple[np.ndarray, np.ndarray]:
  e = config.eval
  real = _first(np.asarray(real, np.float32), int(e.num_real))
  real_labels = _first(np.asarray(real_labels), int(e.num_real))
  _check_arrays(real[:1], real, real_labels, num_labels)
  return real, real_labels


def _kwon_row(kwon: dict[str, Any], batch: int, repeats: int, n: int, m: int) -> dict[str, Any]:
  """The Kwon MMD entry; a spread of exactly 0 is flagged, not reported as a figure.

  With N = B real volumes the real batch of every pass is the same set, and with at most B
  generated volumes so is the generated one: every pass then gives the same number and
  '± 0' would claim a precision the protocol did not measure.
  """
  out = _stats(kwon, batch=batch, repeats=repeats)
  values = np.asarray(kwon.get("values", []), np.float64)
  degenerate = values.size > 1 and float(np.ptp(values)) <= 1e-12 * max(abs(values[0]), 1.0)
  out["degenerate"] = bool(degenerate)
  if degenerate:
    logging.warning("Kwon MMD: every pass gave the same value (%d real, %d generated volumes, "
                    "batch %d): the spread is not measured; evaluate against more real volumes "
                    "(eval.num_real, data.num_val >= 2 x eval.mmd_batch)", m, n, batch)
  return out


def score_real(config: ml_collections.ConfigDict, real: Any, real_labels: Any,
               segmenter: tuple[Any, Any], label_names: list[str], slice_axis: int, *,
               mesh: Any = None) -> dict[str, Any]:
  """The 'Real' row of Table 1: what the protocol gives between real volumes.

  MS-SSIM over pairs of real volumes; the RAS upper bound (first half of the real set,
  segmented by the U-Net, registered to the second half); Gaussian MMD and segmenter FD
  between the halves. It depends only on the real set, the segmenter and `eval`, so a workdir
  computes it once for all the rows it scores (`evaluate_workdir`).
  """
  e = config.eval
  reg_kwargs = _check_eval_config(e)
  real, real_labels = _prepare_real(config, real, real_labels, len(label_names))
  model, variables = segmenter
  mesh = mesh or parallel.make_mesh()
  m, half, k = len(real), len(real) // 2, len(label_names)
  root = jax.random.key(int(e.seed))
  real_row: dict[str, Any] = {"name": "Real", "num_volumes": m, "halves": [half, m - half]}
  if half >= 2:
    value, sigma = mmd.gaussian_mmd(real[:half], real[half:], return_bandwidth=True)
    real_row["mmd_gaussian"] = {"value": float(value), "bandwidth": float(sigma)}
  if min(real.shape[1:]) >= MIN_MS_SSIM_SIZE and m >= 2:
    _ms_ssim_fields(e, real, jax.random.fold_in(root, 2), real_row)
  segment = _segment_fn(model, variables, slice_axis, mesh, int(e.segment_batch))
  if half >= 1:
    upper = ras.ras_real_vs_real(real[:half], real[half:], real_labels[half:], segment, k,
                                 pair_batch=int(e.pair_batch), **reg_kwargs)
    real_row["ras"] = {"mean": _finite_or_none(upper["ras"]),
                       "per_label": _label_dict(label_names, upper["per_label"]),
                       "num_pairs": upper["num_pairs"], "moving": half, "fixed": m - half}
    real_row["_dice"] = upper["dice"]
  else:
    logging.warning("RAS upper bound skipped: it needs at least 2 real volumes, got %d", m)
  if half >= 2:
    feats = _features(config, segmenter, real, slice_axis, mesh)
    real_row["segmenter_fd"] = {"value": frechet.frechet_distance(feats[:half], feats[half:]),
                                "dim": int(feats.shape[1]), "slabs": int(e.fd_slabs)}
  return real_row


def _ms_ssim_fields(e: ml_collections.ConfigDict, vols: np.ndarray, pair_key: jax.Array,
                    target: dict[str, Any]) -> None:
  """MS-SSIM diversity of one set, correct and Kwon modes over the same random pairs."""
  pairs, pb = int(e.msssim_pairs), int(e.msssim_batch)
  for field, kwon_mode in (("ms_ssim", False), ("ms_ssim_kwon", True)):
    r = ms_ssim.pairwise_ms_ssim(vols, pairs, pair_key, batch=pb, kwon=kwon_mode)
    target[field] = _stats(r, pairs=pairs)


def _features(config: ml_collections.ConfigDict, segmenter: tuple[Any, Any], vols: np.ndarray,
              slice_axis: int, mesh: Any) -> np.ndarray:
  model, variables = segmenter
  return frechet.segmenter_features(model, variables, vols, slice_axis,
                                    slabs=int(config.eval.fd_slabs),
                                    batch=int(config.eval.segment_batch), mesh=mesh)


def score_generated(config: ml_collections.ConfigDict, generated: Any, real: Any,
                    real_labels: Any, segmenter: tuple[Any, Any], label_names: list[str],
                    slice_axis: int, name: str = "ours", *, mesh: Any = None
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """One model's row of Table 1 against the real set, and the arrays behind it.

  Returns (row, arrays): row holds mmd_kwon {mean, std, batch, repeats, degenerate},
  mmd_gaussian {value, bandwidth}, ms_ssim / ms_ssim_kwon {mean, std, pairs}, ras {mean,
  per_label, per_volume, num_pairs} and segmenter_fd {value, dim, slabs}; arrays holds the
  U-Net labels of the generated volumes, the per-pair Dice and the segmenter features.
  """
  e = config.eval
  reg_kwargs = _check_eval_config(e)
  generated = _first(np.asarray(generated, np.float32), int(e.num_generated))
  real, real_labels = _prepare_real(config, real, real_labels, len(label_names))
  _check_arrays(generated, real, real_labels, len(label_names))
  mesh = mesh or parallel.make_mesh()
  n, m, k = len(generated), len(real), len(label_names)
  grid = tuple(int(s) for s in generated.shape[1:])
  root = jax.random.key(int(e.seed))
  logging.info("evaluating %s: %d generated vs %d real volumes of %s", name, n, m, grid)

  # --- MMD (Kwon protocol) and the normalised Gaussian-kernel MMD.
  batch = min(int(e.mmd_batch), m)
  if batch < int(e.mmd_batch):
    logging.warning("MMD: only %d real volumes, batch lowered from %d to %d (values are not "
                    "comparable with batch-%d numbers)", m, e.mmd_batch, batch, e.mmd_batch)
  kwon = mmd.kwon_mmd_protocol(real, generated, key=jax.random.fold_in(root, 0), batch=batch,
                               repeats=int(e.mmd_repeats))
  row: dict[str, Any] = {"name": name, "num_generated": n, "num_real": m, "grid": list(grid)}
  row["mmd_kwon"] = _kwon_row(kwon, batch, int(e.mmd_repeats), n, m)
  if n >= 2 and m >= 2:
    value, sigma = mmd.gaussian_mmd(generated, real, return_bandwidth=True)
    row["mmd_gaussian"] = {"value": float(value), "bandwidth": float(sigma)}

  # --- MS-SSIM diversity: the same random pairs in both modes.
  if min(grid) >= MIN_MS_SSIM_SIZE:
    if n >= 2:
      _ms_ssim_fields(e, generated, jax.random.fold_in(root, 1), row)
  else:
    logging.warning("MS-SSIM skipped: the grid %s is under %d voxels on some axis", grid,
                    MIN_MS_SSIM_SIZE)

  # --- RAS: every generated volume, segmented by the U-Net, registered to every real one.
  segment = _segment_fn(segmenter[0], segmenter[1], slice_axis, mesh, int(e.segment_batch))
  gen_labels = segment(generated)
  gen_ras = ras.realistic_atlas_score(generated, real, real_labels, segment, k,
                                      moving_labels=gen_labels, pair_batch=int(e.pair_batch),
                                      **reg_kwargs)
  row["ras"] = {"mean": _finite_or_none(gen_ras["ras"]),
                "per_label": _label_dict(label_names, gen_ras["per_label"]),
                "per_volume": [_finite_or_none(v) for v in gen_ras["per_volume"]],
                "num_pairs": gen_ras["num_pairs"]}

  # --- Segmenter Fréchet distance: features of both sets in one call.
  feats = _features(config, segmenter, np.concatenate([generated, real]), slice_axis, mesh)
  f_gen, f_real = feats[:n], feats[n:]
  if n >= 2 and m >= 2:
    row["segmenter_fd"] = {"value": frechet.frechet_distance(f_gen, f_real),
                           "dim": int(feats.shape[1]), "slabs": int(e.fd_slabs)}
  arrays = {"labels": gen_labels, "dice": gen_ras["dice"], "features": f_gen}
  return row, arrays


def write_row_figures(config: ml_collections.ConfigDict, row: dict[str, Any],
                      generated: np.ndarray, gen_labels: np.ndarray, real: np.ndarray,
                      real_labels: np.ndarray, label_names: list[str], out_dir: str) -> None:
  """The row's Fig. 3 overlay and sample montage in out_dir; their names go into the row."""
  e = config.eval
  os.makedirs(out_dir, exist_ok=True)
  slug = _slug(row["name"])
  row["figures"] = {"overlay": f"overlay_{slug}.png", "montage": f"samples_{slug}.png"}
  # write_report links figures relative to its own folder, which may be another one.
  row["figures_dir"] = os.path.abspath(out_dir)
  n = len(generated)
  panels = [(f"{row['name']} {i}", generated[i], gen_labels[i])
            for i in range(min(int(e.num_figures), n))]
  panels.append(("real (true labels)", real[0], real_labels[0]))
  save_overlays(os.path.join(out_dir, row["figures"]["overlay"]), panels, label_names)
  save_montage(os.path.join(out_dir, row["figures"]["montage"]),
               generated[:max(2 * int(e.num_figures), 1)])


def _public(real_row: dict[str, Any]) -> dict[str, Any]:
  """The real row without its private arrays (keys starting with '_')."""
  return {k: v for k, v in real_row.items() if not k.startswith("_")}


def evaluate_volumes(config: ml_collections.ConfigDict, generated: Any, real: Any,
                     real_labels: Any, segmenter: tuple[Any, Any], label_names: list[str],
                     slice_axis: int, out_dir: str, name: str = "ours", *,
                     mesh: Any = None, extra: dict[str, Any] | None = None,
                     real_row: dict[str, Any] | None = None) -> dict[str, Any]:
  """Every metric of one model's volumes, plus metrics.json, report.md and PNGs in out_dir.

  Args:
    config: reads the `eval` group (and `seed`); see config_lib.base_config.
    generated: [n, X, Y, Z] generated volumes in [0, 1] (the first eval.num_generated used).
    real: [m, X, Y, Z] held-out real volumes in [0, 1] (the first eval.num_real used).
    real_labels: [m, X, Y, Z] integer label maps of `real`, values in [0, K).
    segmenter: (UNet model, variables) of the trained RAS segmenter.
    label_names: the K label names, background first.
    slice_axis: the volume axis the segmenter slices along.
    out_dir: where metrics.json, report.md, ras_dice.npz and the PNGs go.
    name: the model's name in the report's table.
    mesh: device mesh for the segmenter (default: all devices).
    extra: JSON-able facts recorded under 'source' in metrics.json (file names, steps).
    real_row: a `score_real` result for the same real set, segmenter and settings, to reuse
      instead of computing it again.

  Returns:
    {'model': the model's row, 'rows': [that row], 'real': the real row, 'label_names',
    'settings', 'source'} — the contents of metrics.json (see `score_generated` and
    `score_real` for the rows).
  """
  mesh = mesh or parallel.make_mesh()
  row, arrays = score_generated(config, generated, real, real_labels, segmenter, label_names,
                                slice_axis, name, mesh=mesh)
  if real_row is None:
    real_row = score_real(config, real, real_labels, segmenter, label_names, slice_axis,
                          mesh=mesh)
  generated = _first(np.asarray(generated, np.float32), int(config.eval.num_generated))
  real, real_labels = _prepare_real(config, real, real_labels, len(label_names))
  return write_results(config, [(row, arrays, generated)], real_row, real, real_labels,
                       label_names, slice_axis, out_dir, extra)


def write_results(config: ml_collections.ConfigDict,
                  scored: list[tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]],
                  real_row: dict[str, Any], real: np.ndarray, real_labels: np.ndarray,
                  label_names: list[str], slice_axis: int, out_dir: str,
                  extra: dict[str, Any] | None = None,
                  audit: dict[str, Any] | None = None) -> dict[str, Any]:
  """metrics.json, report.md, figures and the per-pair Dice of scored rows, first row first.

  scored: (row, arrays from `score_generated`, the row's volumes) per row.
  audit: `density_stages.audit_workdir` of the first row's volumes, with 'sample_names'.
  """
  e = config.eval
  rows = [r for r, _, _ in scored]
  settings = {"eval": _plain(e), "seed": int(e.seed), "slice_axis": int(slice_axis)}
  result = {"model": rows[0], "rows": rows, "real": _public(real_row),
            "label_names": list(label_names), "settings": settings, "source": dict(extra or {})}
  sections = None
  if audit is not None:
    names = audit.pop("sample_names")
    sections = density_stages.audit_markdown(audit, names)
    result["memorisation"] = dict(density_stages.audit_summary(audit), samples=names)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    for row, arrays, volumes in scored:
      write_row_figures(config, row, volumes, arrays["labels"], real, real_labels, label_names,
                        out_dir)
      saved = {"dice_generated": arrays["dice"], "features_generated": arrays["features"]}
      if "_dice" in real_row:
        saved["dice_real_vs_real"] = real_row["_dice"]
      fileio.save_npz(os.path.join(out_dir, f"ras_dice_{_slug(row['name'])}.npz"), **saved)
    fileio.write_json(os.path.join(out_dir, METRICS_FILE), result)
    write_report(rows, result["real"], out_dir, label_names=list(label_names),
                 notes=_notes(settings), sections=sections)
  for row in rows:
    logging.info("%s: MMD %s ± %s, MS-SSIM %s, RAS %s (real-vs-real %s), segmenter FD %s",
                 row["name"], _fmt(row["mmd_kwon"]["mean"]), _fmt(row["mmd_kwon"]["std"]),
                 _fmt(row.get("ms_ssim", {}).get("mean")), _fmt(row["ras"]["mean"]),
                 _fmt(real_row.get("ras", {}).get("mean")),
                 _fmt(row.get("segmenter_fd", {}).get("value")))
  return result


def _check_arrays(generated: np.ndarray, real: np.ndarray, labels: np.ndarray,
                  num_labels: int) -> None:
  if generated.ndim != 4 or real.ndim != 4:
    raise DataError(f"expected volume sets [n, X, Y, Z]; got generated {generated.shape} and "
                    f"real {real.shape}")
  if len(generated) < 1 or len(real) < 1:
    raise DataError(f"nothing to evaluate: {len(generated)} generated and {len(real)} real "
                    f"volumes")
  if generated.shape[1:] != real.shape[1:]:
    raise DataError(f"generated volumes are {generated.shape[1:]} but real volumes are "
                    f"{real.shape[1:]}: evaluate on one grid (resample first)")
  if labels.shape != real.shape:
    raise DataError(f"real labels {labels.shape} do not match real volumes {real.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
    raise DataError(f"real labels take values [{labels.min()}, {labels.max()}] but the "
                    f"segmenter has {num_labels} labels [0, {num_labels - 1}]; give label maps "
                    f"in the segmenter's label set (e.g. the freesurfer15 grouping)")


def _plain(c: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.to_dict().items()}


def _slug(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "model"


def _fmt(v: Any, digits: int = 4) -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "n/a"
  return f"{v:.{digits}f}"


def _notes(settings: dict[str, Any]) -> list[str]:
  e = settings["eval"]
  return [
      f"Registration: affine, {e['reg_levels']} levels, {e['reg_iters']} Adam steps, "
      f"lr {e['reg_lr']}, similarity {e['similarity']}.",
      f"MMD (Kwon): linear kernel on voxels in [-1, 1], batch {e['mmd_batch']} (lowered to "
      f"the number of real volumes if fewer), {e['mmd_repeats']} passes; a sum over voxels, "
      f"not comparable across grids. MS-SSIM over {e['msssim_pairs']} random distinct pairs.",
  ]


# ---------------------------------------------------------------------------------------------
# Pictures.


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save_figure(fig: Any, path: str) -> None:
  plt = _pyplot()
  with fileio.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)


def _planes(volume: np.ndarray) -> list[np.ndarray]:
  """Mid coronal and mid axial slices of a RAS [X, Y, Z] array, superior/anterior up."""
  _, y, z = (s // 2 for s in volume.shape)
  return [np.rot90(volume[:, y, :]), np.rot90(volume[:, :, z])]


def save_overlays(path: str, panels: list[tuple[str, np.ndarray, np.ndarray]],
                  label_names: list[str]) -> None:
  """Fig. 3: mid coronal and axial slices with labels as a colour overlay, one column each.

  panels: (title, volume [X, Y, Z] in [0, 1], labels [X, Y, Z]); background is left clear.
  """
  plt = _pyplot()
  cols = len(panels)
  fig, axes = plt.subplots(2, cols, figsize=(2.2 * cols, 4.6), squeeze=False)
  cmap = plt.get_cmap("tab20", max(len(label_names), 2))
  for j, (title, vol, lab) in enumerate(panels):
    for i, (img, lb) in enumerate(zip(_planes(vol), _planes(lab))):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0)
      ax.imshow(np.ma.masked_equal(lb, 0), cmap=cmap, vmin=0, vmax=len(label_names) - 1,
                alpha=0.45, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=8)
    axes[0, 0].set_ylabel("coronal", fontsize=8)
    axes[1, 0].set_ylabel("axial", fontsize=8)
  _save_figure(fig, path)


def save_montage(path: str, volumes: np.ndarray) -> None:
  """Three-plane views (viz.three_planes) of volumes [k, X, Y, Z], one row each, grey PNG."""
  rows = [viz.three_planes(v) for v in volumes]
  # Small grids (32³, 64³) are upscaled by whole voxels so that a row is >= 128 pixels high.
  factor = max(1, -(-128 // rows[0].shape[0]))
  rows = [np.repeat(np.repeat(r, factor, axis=0), factor, axis=1) for r in rows]
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]))) for r in rows]
  viz.save_png(path, np.concatenate(rows, axis=0))


def save_ras_chart(path: str, rows: list[dict[str, Any]], real_row: dict[str, Any] | None,
                   label_names: list[str]) -> None:
  """Fig. 4: RAS (mean Dice) per label, one bar per model, the real-vs-real bound beside."""
  plt = _pyplot()
  labels = list(label_names[1:])
  series = [(r["name"], r.get("ras", {}).get("per_label", {}), None) for r in rows]
  if real_row and "ras" in real_row:
    series.append(("Real vs real (upper bound)", real_row["ras"]["per_label"], "//"))
  x = np.arange(len(labels) + 1)                                     # labels, then 'mean'
  width = 0.8 / max(len(series), 1)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(x) * max(len(series), 1) ** 0.5), 3.6))
  for s, (name, per_label, hatch) in enumerate(series):
    vals = [per_label.get(lb) for lb in labels]
    finite = [v for v in vals if v is not None]
    mean = float(np.mean(finite)) if finite else np.nan
    vals = [np.nan if v is None else v for v in vals] + [mean]
    ax.bar(x + (s - (len(series) - 1) / 2) * width, vals, width, label=name, hatch=hatch,
           color="0.75" if hatch else None, edgecolor="0.3" if hatch else None)
  ax.set_xticks(x)
  ax.set_xticklabels(labels + ["mean (RAS)"], rotation=45, ha="right", fontsize=8)
  ax.set_ylim(0.0, 1.0)
  ax.set_ylabel("Dice")
  ax.set_title("Realistic Atlas Score per label")
  ax.legend(fontsize=7, loc="upper right")
  ax.grid(axis="y", alpha=0.3)
  _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Report.


def _pm(d: dict[str, Any] | None, digits: int) -> str:
  if not d or d.get("mean") is None:
    return "—" if not d else "n/a (NaN)"
  if d.get("degenerate"):
    return f"{d['mean']:.{digits}f} (one fixed batch: no spread)"
  std = "" if d.get("std") is None else f" ± {d['std']:.{digits}f}"
  return f"{d['mean']:.{digits}f}{std}"


def _value(d: dict[str, Any] | None, key: str, fmt: str) -> str:
  if not d or d.get(key) is None:
    return "—"
  return format(d[key], fmt)


def _mmd_digits(rows: list[dict[str, Any]]) -> int:
  # Table 1 prints MMD as an integer; small grids give values of order 1-100.
  means = [abs(r["mmd_kwon"]["mean"]) for r in rows
           if r.get("mmd_kwon") and r["mmd_kwon"].get("mean") is not None]
  return 0 if means and min(means) >= 100 else 3


def table_markdown(rows: list[dict[str, Any]], real_row: dict[str, Any] | None) -> str:
  """Table 1 as Markdown: one row per model and a 'Real' row, paper columns first."""
  digits = _mmd_digits(rows)
  head = ("| Model | MMD (Kwon) ↓ | MS-SSIM ↓ | MS-SSIM (Kwon) ↓ | RAS ↑ | Gaussian MMD ↓ "
          "| Segmenter FD ↓ |\n|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    lines.append(f"| {r['name']} | {_pm(r.get('mmd_kwon'), digits)} "
                 f"| {_pm(r.get('ms_ssim'), 4)} | {_pm(r.get('ms_ssim_kwon'), 4)} "
                 f"| {_value(r.get('ras'), 'mean', '.4f')} "
                 f"| {_value(r.get('mmd_gaussian'), 'value', '.4g')} "
                 f"| {_value(r.get('segmenter_fd'), 'value', '.4g')} |")
  if real_row is not None:
    lines.append(f"| Real | — | {_pm(real_row.get('ms_ssim'), 4)} "
                 f"| {_pm(real_row.get('ms_ssim_kwon'), 4)} "
                 f"| {_value(real_row.get('ras'), 'mean', '.4f')} "
                 f"| {_value(real_row.get('mmd_gaussian'), 'value', '.4g')} "
                 f"| {_value(real_row.get('segmenter_fd'), 'value', '.4g')} |")
  return head + "\n".join(lines) + "\n"


def _ras_table(rows: list[dict[str, Any]], real_row: dict[str, Any] | None,
               label_names: list[str]) -> str:
  cols = [r["name"] for r in rows] + (["Real vs real"] if real_row and "ras" in real_row else [])
  per = [r.get("ras", {}).get("per_label", {}) for r in rows]
  if real_row and "ras" in real_row:
    per.append(real_row["ras"]["per_label"])
  out = "| Label | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
  for lb in label_names[1:]:
    out += f"| {lb} | " + " | ".join(_fmt(p.get(lb), 3) for p in per) + " |\n"
  return out


def _reading_notes(rows: list[dict[str, Any]]) -> list[str]:
  """How to read the extra rows: which part of the model limits the samples."""
  kinds = {r.get("kind") for r in rows}
  out = []
  if "latent model" in kinds or "reconstructions" in kinds:
    out += ["Rows below the first score the same trained decoder fed differently: samples of "
            "each latent model fitted on the same checkpoint (the first row is the configured "
            "model's samples), and the held-out volumes' own posterior means decoded "
            "(reconstructions). The reconstructions are what the decoder can do at best: if "
            "they score far from the Real row too, the decoder limits the samples; if they "
            "score close to it and the samples do not, the latent model does.", ""]
  for r in rows:
    rec = r.get("reconstruction")
    if rec:
      out += [f"Reconstruction error of the {rec['num_volumes']} held-out volumes: MSE "
              f"{rec['mse']:.5f}, PSNR {rec['psnr']:.2f} dB (peak 1).", ""]
  return out


def _link(row: dict[str, Any], filename: str, out_dir: str) -> str:
  """A figure's path relative to the report's folder."""
  folder = row.get("figures_dir")
  if not folder:
    return filename
  return os.path.relpath(os.path.join(folder, filename), os.path.abspath(out_dir))


def write_report(results: list[dict[str, Any]], real_row: dict[str, Any] | None, out_dir: str,
                 *, label_names: list[str] | None = None, title: str = "Evaluation",
                 notes: list[str] | None = None, sections: list[str] | None = None) -> str:
  """Writes out_dir/report.md and out_dir/ras_per_label.png for one or several models.

  Args:
    results: one row per model, as `evaluate_volumes(...)['model']`; a row's 'figures'
      entry ({'overlay', 'montage'}: file names in its 'figures_dir', default out_dir) adds
      its pictures, linked relative to out_dir.
    real_row: `evaluate_volumes(...)['real']` (MS-SSIM of real pairs, RAS upper bound) or
      None.
    out_dir: output folder of report.md and the RAS chart.
    label_names: K names, background first (default: from the rows' RAS entries).
    title, notes: heading and bullet points under the table.
    sections: markdown lines appended at the end (e.g. the memorisation audit).
  Returns:
    The report's path.
  """
  if not results:
    raise ValueError("write_report needs at least one model row")
  if label_names is None:
    label_names = ["background"] + list(results[0].get("ras", {}).get("per_label", {}))
  grid = results[0].get("grid")
  md = [f"# {title}", ""]
  if grid:
    md += [f"Grid {'×'.join(str(g) for g in grid)}; "
           + ", ".join(f"{r['name']}: {r.get('num_generated', '?')} generated" for r in results)
           + f"; {results[0].get('num_real', '?')} real held-out volumes.", ""]
  md += ["## Table 1", "", table_markdown(results, real_row)]
  md += _reading_notes(results)
  md += [
      "MMD (Kwon): Kwon et al.'s minibatch MMD, mean ± std over passes (lower is closer to "
      "the real distribution). MS-SSIM: mean ± std over random pairs of one set (lower is more "
      "diverse); 'Kwon' is the reference formula with its last-scale exponent, for comparison "
      "with the paper, the other column the correct five-scale form. RAS: mean Dice over "
      "labels (background excluded) of each volume's U-Net segmentation, affinely registered "
      "to each real volume. Gaussian MMD: normalised, unbiased, median-heuristic bandwidth. "
      "Segmenter FD: Fréchet distance of our RAS U-Net's bottleneck features — a 3D stand-in "
      "for FID, not an FID.",
      "",
      "The Real row: MS-SSIM between pairs of real volumes; RAS from one half of the real set "
      "(segmented by the U-Net, like generated volumes) to the other half, the upper bound of "
      "the protocol; Gaussian MMD and segmenter FD between the two halves (fewer volumes, so "
      "more finite-sample bias).",
      ""]
  for note in notes or []:
    md.append(f"- {note}")
  if notes:
    md.append("")
  chart = os.path.join(out_dir, RAS_CHART)
  save_ras_chart(chart, results, real_row, label_names)
  md += ["## Realistic Atlas Score per label (Fig. 4)", "", f"![RAS per label]({RAS_CHART})",
         "", _ras_table(results, real_row, label_names)]
  for r in results:
    figs = {k: _link(r, f, out_dir) for k, f in (r.get("figures") or {}).items()}
    if figs.get("overlay"):
      md += [f"## Segmentations: {r['name']} (Fig. 3)", "",
             "Mid coronal (top) and axial (bottom) slices with the U-Net's labels; the last "
             "column is a real volume with its true labels.", "",
             f"![segmentations of {r['name']}]({figs['overlay']})", ""]
    if figs.get("montage"):
      md += [f"## Samples: {r['name']}", "", "Sagittal, coronal and axial mid-slices.", "",
             f"![samples of {r['name']}]({figs['montage']})", ""]
  md += sections or []
  path = os.path.join(out_dir, REPORT_FILE)
  fileio.write_text(path, "\n".join(md))
  return path


# ---------------------------------------------------------------------------------------------
# Files: a workdir, or folders of NIfTI volumes.


def list_nifti(folder: str, what: str) -> list[str]:
  """Sorted .nii / .nii.gz files in `folder`; DataError naming it if missing or empty."""
  if not os.path.isdir(folder):
    raise DataError(f"{folder}: {what} folder does not exist")
  paths = sorted(glob.glob(os.path.join(folder, "*.nii.gz"))
                 + glob.glob(os.path.join(folder, "*.nii")))
  if not paths:
    raise DataError(f"{folder}: no {what} (.nii / .nii.gz files) in this folder")
  return paths


def to_unit_range(volume: np.ndarray, path: str) -> tuple[np.ndarray, bool]:
  """Volumes within [0, 1] (± RANGE_TOLERANCE) are clipped; others rescaled by min/max.

  Other models write volumes in [-1, 1] (tanh outputs) or in scanner units; MMD and
  MS-SSIM need [0, 1]. A min/max rescaling is the only choice that needs no knowledge of the
  model, but it is not the real data's percentile normalisation, so MMD values of rescaled
  volumes carry that difference; volumes already in [0, 1] are left as they are.
  Returns (volume in [0, 1], whether it was rescaled).
  """
  lo, hi = float(volume.min()), float(volume.max())
  if lo >= -RANGE_TOLERANCE and hi <= 1.0 + RANGE_TOLERANCE:
    return np.clip(volume, 0.0, 1.0), False
  if hi - lo <= 0:
    raise DataError(f"{path}: constant volume (value {lo}); cannot rescale it to [0, 1]")
  logging.info("%s: values in [%.4g, %.4g], rescaled by min/max to [0, 1]", path, lo, hi)
  return (volume - lo) / (hi - lo), True


def load_set(paths: list[str], what: str) -> np.ndarray:
  """Loads volumes [n, X, Y, Z] in [0, 1]; every file on the grid of the first."""
  vols, rescaled = [], 0
  for p in paths:
    v, _ = nifti.load_volume(p)
    if vols and v.shape != vols[0].shape:
      raise DataError(f"{p}: shape {v.shape} differs from {paths[0]}: {vols[0].shape}; all "
                      f"{what} must share one grid")
    v, changed = to_unit_range(v, p)
    rescaled += changed
    vols.append(v.astype(np.float32))
  if rescaled:
    logging.warning("%d of %d %s were outside [0, 1] and were rescaled by their min/max "
                    "(see evaluate.to_unit_range)", rescaled, len(paths), what)
  return np.stack(vols)


def _load_labels(paths: list[str], shapes: tuple[int, ...]) -> np.ndarray:
  out = []
  for p in paths:
    lab, _ = nifti.load_labels(p)
    if lab.shape != shapes:
      raise DataError(f"{p}: label map shape {lab.shape} differs from its volume's {shapes}")
    out.append(lab)
  return np.stack(out)


def ensure_segmenter(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
                     mesh: Any = None) -> tuple[Any, Any]:
  """(model, variables) of the workdir's RAS segmenter, trained or resumed first if needed.

  Training happens when the newest finished checkpoint is short of segmenter.num_steps and
  eval.train_segmenter is set; without it, an unfinished segmenter is used with a warning
  and a missing one is a DataError.
  """
  ckpt_dir = os.path.join(workdir, seg_lib.SUBDIR, trainer.CHECKPOINT_DIR)
  steps = ckpt_lib.finished_steps(ckpt_dir)
  if not steps or max(steps) < int(config.segmenter.num_steps):
    if config.eval.train_segmenter:
      logging.info("RAS segmenter: training to step %d in %s", config.segmenter.num_steps,
                   os.path.dirname(ckpt_dir))
      seg_lib.train_segmenter(config, workdir, cache, mesh)
    elif not steps:
      raise DataError(f"{ckpt_dir}: no trained RAS segmenter; train it (eval.train_segmenter="
                      f"True) or point to a workdir that has one")
    else:
      logging.warning("RAS segmenter at step %d of %d (eval.train_segmenter is off)",
                      max(steps), config.segmenter.num_steps)
  return seg_lib.load_segmenter(config, workdir, cache, mesh)


def labelled_val(cache: VolumeCache, limit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
  if not cache.manifest.get("has_labels") or not cache.manifest.get("label_names"):
    raise DataError(f"{cache.path}: evaluation needs labelled real volumes for the RAS, and "
                    f"this cache has no labels (give label files: HCP aparc+aseg or "
                    f"data.labels_dir)")
  val = cache.split("val")
  if not val:
    raise DataError(f"{cache.path}: no held-out ('val') volumes to evaluate against; set "
                    f"data.num_val > 0")
  val = val[:limit] if limit else val
  real = np.stack([cache.volume(i) for i in val])
  labels = np.stack([cache.label_volume(i) for i in val])
  return real, labels, list(cache.manifest["label_names"])


def _sources(workdir: str) -> dict[str, Any]:
  """What the workdir's evaluation scores: the sample index and every latent file's digest."""
  index = os.path.join(workdir, SAMPLES_DIR, "samples.json")
  out: dict[str, Any] = {"samples": fileio.read_json(index) if os.path.exists(index) else None}
  for kind, path in sorted(fit_latent_lib.latent_files(workdir).items()):
    out.setdefault("latent_files", {})[kind] = staleness.file_sha256(path)
  return out


def is_current(workdir: str) -> bool:
  """True when <workdir>/eval/metrics.json scores the samples and latent models now there."""
  metrics = os.path.join(workdir, EVAL_DIR, METRICS_FILE)
  index = os.path.join(workdir, SAMPLES_DIR, "samples.json")
  if not (os.path.exists(metrics) and os.path.exists(index)):
    return False
  source = fileio.read_json(metrics).get("source", {})
  now = _sources(workdir)
  return all(source.get(k) == v for k, v in now.items())


def real_row_for(config: ml_collections.ConfigDict, workdir: str, real: np.ndarray,
                 labels: np.ndarray, names: list[str], segmenter: tuple[Any, Any],
                 slice_axis: int, identity: dict[str, Any], mesh: Any = None) -> dict[str, Any]:
  """`score_real` of the workdir's real set, computed once and reused while it is current.

  `identity` names what the row depends on (real volumes, segmenter step); with the eval
  settings it is stored beside the row in <workdir>/eval/real_row.json (the per-pair Dice in
  real_row_dice.npz), and a later call with the same identity reads the row back instead of
  registering the real pairs again.
  """
  out_dir = os.path.join(workdir, EVAL_DIR)
  path, dice_path = os.path.join(out_dir, REAL_ROW_FILE), os.path.join(out_dir, REAL_DICE_FILE)
  key = dict(identity, eval=_plain(config.eval))
  if os.path.exists(path):
    saved = fileio.read_json(path)
    if saved.get("key") == json.loads(json.dumps(key)) and os.path.exists(dice_path):
      logging.info("real row: reusing %s", path)
      row = saved["row"]
      with np.load(dice_path) as npz:
        row["_dice"] = npz["dice"]
      return row
  row = score_real(config, real, labels, segmenter, names, slice_axis, mesh=mesh)
  if jax.process_index() == 0:
    if "_dice" in row:
      fileio.save_npz(dice_path, dice=row["_dice"])
    fileio.write_json(path, {"key": key, "row": _public(row)})
  return row


def reconstruction_error(reconstructed: np.ndarray, real: np.ndarray) -> dict[str, float]:
  """Mean squared error and PSNR (peak 1) of volumes in [0, 1] against their originals."""
  err = np.mean(np.square(np.asarray(reconstructed, np.float64) - np.asarray(real, np.float64)),
                axis=(1, 2, 3))
  psnr = 10.0 * np.log10(1.0 / np.maximum(err, 1e-12))
  return {"mse": float(err.mean()), "psnr": float(psnr.mean()), "num_volumes": int(len(err))}


def _reconstructions(bundle: Any, real: np.ndarray, slice_axis: int) -> np.ndarray:
  """Held-out volumes encoded to their posterior means and decoded: the decoder's best."""
  stacks = np.stack([to_stack(v, slice_axis) for v in real])
  latents = inference.encode_stacks(bundle, stacks, int(bundle.config.latent.encode_batch))
  return inference.decode_latents(bundle, latents, int(bundle.config.sample.batch_volumes))


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
                     mesh: Any = None) -> dict[str, Any]:
  """The evaluate stage: <workdir>/samples/*.nii.gz vs the cache's 'val' volumes.

  Trains (or resumes) the RAS segmenter in <workdir>/segmenter/ when needed
  (`ensure_segmenter`). For a slice VAE the table gets, beside the samples' row, a row for
  the reconstructions of the held-out volumes (what the decoder can do at best,
  eval.reconstructions) and a row for every other latent model fitted on the same checkpoint
  (eval.latent_models, sampled with the samples' key), so the report shows whether the
  decoder or the latent model limits the samples. The real row is computed once
  (`real_row_for`). Writes <workdir>/eval/{metrics.json, report.md, *.png, *.npz}; returns
  {'model': the samples' row, 'rows': every row, 'real': the real row, ...}.
  """
  e = config.eval
  _check_eval_config(e)
  real, labels, names = labelled_val(cache, int(e.num_real))
  sample_dir = os.path.join(workdir, SAMPLES_DIR)
  if not os.path.isdir(sample_dir):
    raise DataError(f"{sample_dir}: no samples; run --mode=sample first")
  paths = list_nifti(sample_dir, "generated samples")
  paths = paths[:int(e.num_generated)] if int(e.num_generated) else paths
  generated = load_set(paths, "generated samples")
  if generated.shape[1:] != real.shape[1:]:
    raise DataError(f"{paths[0]}: shape {generated.shape[1:]} differs from the cache grid "
                    f"{real.shape[1:]} of {cache.path}")
  mesh = mesh or parallel.make_mesh()
  seg = ensure_segmenter(config, workdir, cache, mesh)
  seg_steps = ckpt_lib.finished_steps(os.path.join(workdir, seg_lib.SUBDIR,
                                                   trainer.CHECKPOINT_DIR))
  val_ids = [cache.subjects[i]["id"] for i in cache.split("val")][:len(real)]
  real_row = real_row_for(config, workdir, real, labels, names, seg, cache.slice_axis,
                          {"real": val_ids, "cache": os.path.abspath(cache.path),
                           "segmenter_step": max(seg_steps) if seg_steps else None}, mesh)

  # The extra rows need the trained slice VAE (a folder of samples alone gets one row).
  slice_vae = (config.model_type == "slice_vae"
               and bool(ckpt_lib.finished_steps(os.path.join(workdir, trainer.CHECKPOINT_DIR)))
               and bool(fit_latent_lib.latent_files(workdir)))
  main_kind = config.latent.model
  main_name = f"{config.name} ({main_kind} latent)" if slice_vae else config.name
  sets: list[tuple[str, np.ndarray]] = [(main_name, generated)]
  if slice_vae:
    bundle = inference.load_for_inference(workdir, mesh=mesh)
    key = jax.random.key(int(config.sample.seed))
    for kind, path in fit_latent_lib.latent_files(workdir).items():
      if kind == main_kind or kind not in e.latent_models:
        continue
      g, _ = lg.load(path)
      other = dataclasses.replace(bundle, gaussian=g)
      sets.append((f"{config.name} ({kind} latent)",
                   inference.sample_volumes(other, key, len(generated))))
    if e.reconstructions:
      # As many as there are samples, so every row costs the same number of registrations.
      sets.append((RECON_NAME,
                   _reconstructions(bundle, real[:len(generated)], cache.slice_axis)))
  scored = []
  for i, (name, vols) in enumerate(sets):
    row, arrays = score_generated(config, vols, real, labels, seg, names, cache.slice_axis,
                                  name, mesh=mesh)
    row["kind"] = "samples" if i == 0 else ("reconstructions" if name == RECON_NAME
                                            else "latent model")
    if name == RECON_NAME:
      row["reconstruction"] = reconstruction_error(vols, real[:len(vols)])
    scored.append((row, arrays, vols))
  source = {"generated": [os.path.basename(p) for p in paths], "real_cache": cache.path,
            "segmenter_workdir": os.path.abspath(workdir), **_sources(workdir)}
  out_dir = os.path.join(workdir, EVAL_DIR)
  audit = None
  if e.memorisation_audit and cache.split("train"):
    os.makedirs(out_dir, exist_ok=True)
    audit = density_stages.audit_workdir(cache, generated, real,
                                         bundle if slice_vae else None, out_dir)
    audit["sample_names"] = [os.path.basename(p) for p in paths]
  return write_results(config, scored, real_row, real, labels, names, cache.slice_axis,
                       out_dir, source, audit=audit)


def evaluate_folders(config: ml_collections.ConfigDict, generated_dir: str, real_dir: str,
                     real_labels_dir: str, segmenter_workdir: str, out_dir: str,
                     name: str | None = None, mesh: Any = None) -> dict[str, Any]:
  """Any model's NIfTI volumes vs real NIfTI volumes with labels, through `evaluate_volumes`.

  Args:
    config: the experiment config of `segmenter_workdir` (its `segmenter`, `data.cache_dir`
      and `eval` groups are read).
    generated_dir: folder of generated .nii/.nii.gz volumes (the first eval.num_generated,
      sorted by name).
    real_dir: folder of real volumes, preprocessed like the training data, on the same grid.
    real_labels_dir: label maps with the same file names as in real_dir, in the segmenter's
      label set (values 0..K-1).
    segmenter_workdir: a workdir whose cache holds the labelled data the RAS segmenter is
      (or, with eval.train_segmenter, will be) trained on.
    out_dir: where metrics.json, report.md and the PNGs go.
    name: the model's name in the report (default: the generated folder's name).

  Volumes outside [0, 1] are rescaled by their min/max (`to_unit_range`). Raises DataError
  for an empty or missing folder, a missing label file, or grids that differ between files,
  between generated and real volumes, or from the segmenter's grid.
  """
  from slicevae_jax import pipeline  # pylint: disable=import-outside-toplevel
  e = config.eval
  _check_eval_config(e)
  gen_paths = list_nifti(generated_dir, "generated volumes")
  real_paths = list_nifti(real_dir, "real volumes")
  if not os.path.isdir(real_labels_dir):
    raise DataError(f"{real_labels_dir}: label folder does not exist")
  gen_paths = gen_paths[:int(e.num_generated)] if int(e.num_generated) else gen_paths
  real_paths = real_paths[:int(e.num_real)] if int(e.num_real) else real_paths
  label_paths = [os.path.join(real_labels_dir, os.path.basename(p)) for p in real_paths]
  for lp, rp in zip(label_paths, real_paths):
    if not os.path.isfile(lp):
      raise DataError(f"{lp}: missing label map for real volume {rp} (label files need the "
                      f"same names as the real volumes)")
  generated = load_set(gen_paths, "generated volumes")
  real = load_set(real_paths, "real volumes")
  if generated.shape[1:] != real.shape[1:]:
    raise DataError(f"grids differ: generated {gen_paths[0]} is {generated.shape[1:]}, real "
                    f"{real_paths[0]} is {real.shape[1:]}; resample to one grid first")
  labels = _load_labels(label_paths, real.shape[1:])

  cache_path = pipeline.cache_dir(config, segmenter_workdir)
  if not VolumeCache.exists(cache_path):
    raise DataError(f"{cache_path}: no cache in the segmenter workdir {segmenter_workdir}; the "
                    f"RAS segmenter is trained on that cache's labelled volumes (run "
                    f"--mode=preprocess there first)")
  cache = VolumeCache(cache_path)
  if tuple(cache.grid) != tuple(real.shape[1:]):
    raise DataError(f"{real_paths[0]}: grid {real.shape[1:]} differs from the segmenter's "
                    f"training grid {tuple(cache.grid)} ({cache_path}); the RAS needs a "
                    f"segmenter trained at the evaluated resolution")
  names = seg_lib.label_names(cache)
  mesh = mesh or parallel.make_mesh()
  seg = ensure_segmenter(config, segmenter_workdir, cache, mesh)
  name = name or os.path.basename(os.path.normpath(generated_dir))
  source = {"generated_dir": os.path.abspath(generated_dir),
            "generated": [os.path.basename(p) for p in gen_paths],
            "real_dir": os.path.abspath(real_dir), "labels_dir": os.path.abspath(real_labels_dir),
            "real": [os.path.basename(p) for p in real_paths],
            "segmenter_workdir": os.path.abspath(segmenter_workdir)}
  return evaluate_volumes(config, generated, real, labels, seg, names, cache.slice_axis, out_dir,
                          name=name, mesh=mesh, extra=source)


# ---------------------------------------------------------------------------------------------
# Command line (flags are defined only when run as a program, so importing this module from
# main.py or a notebook defines none).


def _define_flags() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config of the segmenter workdir, e.g. configs/hcp64.py.",
      lock_config=True)
  flags.DEFINE_string("generated", None, "Folder of generated .nii/.nii.gz volumes.")
  flags.DEFINE_string("real", None, "Folder of real volumes on the same grid.")
  flags.DEFINE_string("labels", None, "Folder of the real volumes' label maps (same names).")
  flags.DEFINE_string("segmenter_workdir", None, "Workdir holding the RAS segmenter and cache.")
  flags.DEFINE_string("out", None, "Output folder for metrics.json, report.md and PNGs.")
  flags.DEFINE_string("name", None, "Model name in the report (default: generated folder).")
  flags.mark_flags_as_required(["config", "generated", "real", "labels", "segmenter_workdir",
                                "out"])


def _cli(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from slicevae_jax.errors import run_command  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS

  def body():
    parallel.initialize_distributed(f.config.dist)
    evaluate_folders(f.config, f.generated, f.real, f.labels, f.segmenter_workdir, f.out,
                     name=f.name)
  run_command(argv, body)


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=import-outside-toplevel
  _define_flags()
  _app.run(_cli)
