r"""Evaluate stage: generated volumes + held-out real volumes -> Table 1 rows -> report.

Last stage of the data flow (sample -> evaluate; paper §2.2, §4). One code path scores our
samples and any other model's:

* `evaluate_volumes` — arrays in, metrics and pictures out: Kwon MMD (mean ± std), the
  normalised Gaussian-kernel MMD, 3D MS-SSIM diversity of the generated set and of the real
  set (correct and Kwon modes), the Realistic Atlas Score against the real set with the
  real-vs-real upper bound, and the segmenter Fréchet distance.
* `evaluate_workdir` — a trained workdir: `<workdir>/samples/*.nii.gz` against the cache's
  'val' split, with the RAS segmenter trained (or resumed) in `<workdir>/segmenter/` if
  needed; writes `<workdir>/eval/`.
* `evaluate_folders` — folders of NIfTI files (e.g. another model's samples) against a folder
  of real volumes and a folder of their label maps, with the segmenter of an existing workdir
  (`--mode=evaluate_folders` of main.py).

The report itself is `report.py`, the memorisation audit `audit.py`. Real volumes: the held-out
set (at most `eval.num_real`), cut into two halves for the real row (upper bound, Gaussian MMD,
Fréchet distance: fewer volumes, more finite-sample bias). The RAS registers generated volumes
to the second half, as the bound registers the first half, so the two differ only by atlases.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from slicevae_jax import config_lib
from slicevae_jax import fileio
from slicevae_jax import parallel
from slicevae_jax import rng
from slicevae_jax import staleness
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data import nifti
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import DataError
from slicevae_jax.eval import audit as audit_lib
from slicevae_jax.eval import report
from slicevae_jax.eval import segmenter as seg_lib
from slicevae_jax.metrics import frechet, mmd, ms_ssim, ras
from slicevae_jax.slicevae import density
from slicevae_jax.slicevae import fit_latent as fit_latent_lib
from slicevae_jax.slicevae import inference
from slicevae_jax.slicevae import latent as lg

RECON_NAME = "reconstructions of held-out volumes"
MIN_MS_SSIM_SIZE = 2 ** len(ms_ssim.MS_SSIM_WEIGHTS)


# ---------------------------------------------------------------------------------------------
# Settings.


def registration_settings(e: ml_collections.ConfigDict) -> dict[str, Any]:
  """Keyword arguments of `registration.register_affine` from config.eval (reg_*,
  similarity), after config_lib.check_eval (part of validate)."""
  config_lib.check_eval(e)
  return dict(levels=int(e.reg_levels), iters=tuple(int(i) for i in e.reg_iters),
              lr=float(e.reg_lr), similarity=str(e.similarity), fine_stride=int(e.reg_fine_stride))


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
  """volumes [k, X, Y, Z] -> U-Net labels [k, X, Y, Z], the `segment_fn` of metrics.ras."""
  return functools.partial(seg_lib.segment_volumes, model, variables, slice_axis=slice_axis,
                           mesh=mesh, batch=batch)


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
  reg_kwargs = registration_settings(e)
  real, real_labels = _prepare_real(config, real, real_labels, len(label_names))
  model, variables = segmenter
  mesh = mesh or parallel.make_mesh()
  m, half, k = len(real), len(real) // 2, len(label_names)
  real_row: dict[str, Any] = {"name": "Real", "num_volumes": m, "halves": [half, m - half]}
  if half >= 2:
    value, sigma = mmd.gaussian_mmd(real[:half], real[half:], return_bandwidth=True)
    real_row["mmd_gaussian"] = {"value": float(value), "bandwidth": float(sigma)}
  if min(real.shape[1:]) >= MIN_MS_SSIM_SIZE and m >= 2:
    _ms_ssim_fields(e, real, rng.eval_key(config, "ms_ssim_real"), real_row)
  segment = _segment_fn(model, variables, slice_axis, mesh, int(e.segment_batch))
  if half >= 1:
    upper = ras.ras_real_vs_real(real[:half], real[half:], real_labels[half:], segment, k,
                                 pair_batch=int(e.pair_batch), **reg_kwargs)
    real_row["ras"] = {"mean": _finite_or_none(upper["ras"]),
                       "per_label": _label_dict(label_names, upper["per_label"]),
                       "num_pairs": upper["num_pairs"], "moving": half, "fixed": m - half}
    real_row["_dice"] = upper["dice"]
    report.warn_missed_labels(real_row)
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
  return seg_lib.segmenter_features(model, variables, vols, slice_axis,
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
  reg_kwargs = registration_settings(e)
  generated = _first(np.asarray(generated, np.float32), int(e.num_generated))
  real, real_labels = _prepare_real(config, real, real_labels, len(label_names))
  _check_arrays(generated, real, real_labels, len(label_names))
  mesh = mesh or parallel.make_mesh()
  n, m, k = len(generated), len(real), len(label_names)
  grid = tuple(int(s) for s in generated.shape[1:])
  logging.info("evaluating %s: %d generated vs %d real volumes of %s", name, n, m, grid)

  # --- MMD (Kwon protocol) and the normalised Gaussian-kernel MMD.
  batch = min(int(e.mmd_batch), m)
  if batch < int(e.mmd_batch):
    logging.warning("MMD: only %d real volumes, batch lowered from %d to %d (values are not "
                    "comparable with batch-%d numbers)", m, e.mmd_batch, batch, e.mmd_batch)
  kwon = mmd.kwon_mmd_protocol(real, generated, key=rng.eval_key(config, "mmd"), batch=batch,
                               repeats=int(e.mmd_repeats))
  row: dict[str, Any] = {"name": name, "num_generated": n, "num_real": m, "grid": list(grid)}
  row["mmd_kwon"] = _kwon_row(kwon, batch, int(e.mmd_repeats), n, m)
  if n >= 2 and m >= 2:
    value, sigma = mmd.gaussian_mmd(generated, real, return_bandwidth=True)
    row["mmd_gaussian"] = {"value": float(value), "bandwidth": float(sigma)}

  # --- MS-SSIM diversity: the same random pairs in both modes.
  if min(grid) >= MIN_MS_SSIM_SIZE:
    if n >= 2:
      _ms_ssim_fields(e, generated, rng.eval_key(config, "ms_ssim"), row)
  else:
    logging.warning("MS-SSIM skipped: the grid %s is under %d voxels on some axis", grid,
                    MIN_MS_SSIM_SIZE)

  # --- RAS: every generated volume, segmented by the U-Net, registered to each real volume
  # of the fixed half, the atlases' targets of the real row's upper bound (`real_row`): the
  # two scores then differ only by what is registered, and each row costs n·M/2 pairs.
  fixed = slice(m // 2, m) if m >= 2 else slice(0, m)
  segment = _segment_fn(segmenter[0], segmenter[1], slice_axis, mesh, int(e.segment_batch))
  gen_labels = segment(generated)
  gen_ras = ras.realistic_atlas_score(generated, real[fixed], real_labels[fixed], segment, k,
                                      moving_labels=gen_labels, pair_batch=int(e.pair_batch),
                                      **reg_kwargs)
  row["ras"] = {"mean": _finite_or_none(gen_ras["ras"]),
                "per_label": _label_dict(label_names, gen_ras["per_label"]),
                "per_volume": [_finite_or_none(v) for v in gen_ras["per_volume"]],
                "num_pairs": gen_ras["num_pairs"], "fixed": len(real[fixed])}

  # --- Segmenter Fréchet distance: features of both sets in one call.
  feats = _features(config, segmenter, np.concatenate([generated, real]), slice_axis, mesh)
  f_gen, f_real = feats[:n], feats[n:]
  if n >= 2 and m >= 2:
    row["segmenter_fd"] = {"value": frechet.frechet_distance(f_gen, f_real),
                           "dim": int(feats.shape[1]), "slabs": int(e.fd_slabs)}
  arrays = {"labels": gen_labels, "dice": gen_ras["dice"], "features": f_gen}
  return row, arrays


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
  return report.write_results(config, [(row, arrays, generated)], real_row, real, real_labels,
                              label_names, slice_axis, out_dir, extra)


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


# ---------------------------------------------------------------------------------------------
# The stage: a workdir, or folders of NIfTI volumes.


def _sources(workdir: str) -> dict[str, Any]:
  """What the workdir's evaluation scores: the sample index and every latent file's digest."""
  index = workdir_lib.samples_index(workdir)
  out: dict[str, Any] = {"samples": fileio.read_json(index) if os.path.exists(index) else None}
  for kind, path in sorted(fit_latent_lib.latent_files(workdir).items()):
    out.setdefault("latent_files", {})[kind] = staleness.file_sha256(path)
  return out


def is_current(workdir: str) -> bool:
  """True when <workdir>/eval/metrics.json scores the samples and latent models now there."""
  metrics = os.path.join(workdir_lib.eval_dir(workdir), workdir_lib.METRICS_FILE)
  index = workdir_lib.samples_index(workdir)
  if not (os.path.exists(metrics) and os.path.exists(index)):
    return False
  source = fileio.read_json(metrics).get("source", {})
  now = _sources(workdir)
  return all(source.get(k) == v for k, v in now.items())


def real_row_for(config: ml_collections.ConfigDict, workdir: str, real: np.ndarray,
                 labels: np.ndarray, names: list[str], segmenter: tuple[Any, Any],
                 slice_axis: int, identity: dict[str, Any], mesh: Any = None) -> dict[str, Any]:
  """`score_real` of the workdir's real set, computed once and reused while it is current.

  `identity` names what the row depends on (real volumes, segmenter step and variables'
  digest); with the eval settings it is stored beside the row in <workdir>/eval/real_row.json
  (per-pair Dice: real_row_dice.npz); a later call of the same identity reads it back.
  """
  out_dir = workdir_lib.eval_dir(workdir)
  path = os.path.join(out_dir, workdir_lib.REAL_ROW_FILE)
  dice_path = os.path.join(out_dir, workdir_lib.REAL_DICE_FILE)
  key = dict(identity, eval=report.plain(config.eval))
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
    fileio.write_json(path, {"key": key, "row": report.public(row)})
  return row


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
  registration_settings(e)
  real, labels, names = cache.held_out(int(e.num_real))
  sample_dir = workdir_lib.samples_dir(workdir)
  if not os.path.isdir(sample_dir):
    raise DataError(f"{sample_dir}: no samples; run --mode=sample first")
  paths = nifti.list_nifti(sample_dir, "generated samples")
  paths = paths[:int(e.num_generated)] if int(e.num_generated) else paths
  generated = nifti.load_set(paths, "generated samples")
  if generated.shape[1:] != real.shape[1:]:
    raise DataError(f"{paths[0]}: shape {generated.shape[1:]} differs from the cache grid "
                    f"{real.shape[1:]} of {cache.path}")
  mesh = mesh or parallel.make_mesh()
  seg = seg_lib.ensure_segmenter(config, workdir, cache, mesh)
  val_ids = [cache.subjects[i]["id"] for i in cache.split("val")][:len(real)]
  ident = {"real": val_ids, "cache": os.path.abspath(cache.path),
           "segmenter_step": workdir_lib.latest_step(workdir_lib.segmenter_dir(workdir)),
           "segmenter_sha256": seg_lib.variables_digest(seg[1])}
  real_row = real_row_for(config, workdir, real, labels, names, seg, cache.slice_axis, ident, mesh)

  # The extra rows need the trained slice VAE (a folder of samples alone gets one row).
  slice_vae = (config.model_type == "slice_vae"
               and workdir_lib.latest_step(workdir) is not None
               and bool(fit_latent_lib.latent_files(workdir)))
  main_kind = config.latent.model
  main_name = f"{config.name} ({main_kind} latent)" if slice_vae else config.name
  sets: list[tuple[str, np.ndarray]] = [(main_name, generated)]
  if slice_vae:
    bundle = inference.load_for_inference(workdir, mesh=mesh)
    key = rng.sample_key(config)
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
                   inference.reconstruct_volumes(bundle, real[:len(generated)])))
  scored = []
  for i, (name, vols) in enumerate(sets):
    row, arrays = score_generated(config, vols, real, labels, seg, names, cache.slice_axis,
                                  name, mesh=mesh)
    row["kind"] = "samples" if i == 0 else ("reconstructions" if name == RECON_NAME
                                            else "latent model")
    if name == RECON_NAME:
      row["reconstruction"] = density.reconstruction_error(vols, real[:len(vols)])
    scored.append((row, arrays, vols))
  source = {"generated": [os.path.basename(p) for p in paths], "real_cache": cache.path,
            "segmenter_workdir": os.path.abspath(workdir), **_sources(workdir)}
  out_dir = workdir_lib.eval_dir(workdir)
  memorisation = sections = None
  if e.memorisation_audit and cache.split("train"):
    memorisation, sections = audit_lib.audit_report(
        cache, generated, real, bundle if slice_vae else None, out_dir,
        [os.path.basename(p) for p in paths])
  return report.write_results(config, scored, real_row, real, labels, names, cache.slice_axis,
                              out_dir, source, memorisation=memorisation, sections=sections)


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
      (or, with eval.train_segmenter, will be) trained on; or a model bundle with one.
    out_dir: where metrics.json, report.md and the PNGs go.
    name: the model's name in the report (default: the generated folder's name).
  Volumes outside [0, 1] are rescaled by their min/max (`data.intensity.to_unit_range`).
  DataError for an empty or missing folder, a missing label file, or grids that differ
  between files, between generated and real volumes, or from the segmenter's grid.
  """
  e = config.eval
  registration_settings(e)
  gen_paths = nifti.list_nifti(generated_dir, "generated volumes")
  real_paths = nifti.list_nifti(real_dir, "real volumes")
  if not os.path.isdir(real_labels_dir):
    raise DataError(f"{real_labels_dir}: label folder does not exist")
  gen_paths = gen_paths[:int(e.num_generated)] if int(e.num_generated) else gen_paths
  real_paths = real_paths[:int(e.num_real)] if int(e.num_real) else real_paths
  label_paths = [os.path.join(real_labels_dir, os.path.basename(p)) for p in real_paths]
  for lp, rp in zip(label_paths, real_paths):
    if not os.path.isfile(lp):
      raise DataError(f"{lp}: missing label map for real volume {rp} (label files need the "
                      f"same names as the real volumes)")
  generated = nifti.load_set(gen_paths, "generated volumes")
  real = nifti.load_set(real_paths, "real volumes")
  if generated.shape[1:] != real.shape[1:]:
    raise DataError(f"grids differ: generated {gen_paths[0]} is {generated.shape[1:]}, real "
                    f"{real_paths[0]} is {real.shape[1:]}; resample to one grid first")
  labels = nifti.load_label_set(label_paths, real.shape[1:])

  mesh = mesh or parallel.make_mesh()
  if workdir_lib.is_bundle(segmenter_workdir):   # no cache: the bundle's record and config
    seg, names = seg_lib.load_bundle_segmenter(config, segmenter_workdir, real.shape[1:], mesh)
    return evaluate_volumes(config, generated, real, labels, seg, names,
                            int(config.data.slice_axis), out_dir, mesh=mesh,
                            name=name or os.path.basename(os.path.normpath(generated_dir)))
  cache_path = workdir_lib.cache_dir(config, segmenter_workdir)
  if not VolumeCache.exists(cache_path):
    raise DataError(f"{cache_path}: no cache in the segmenter workdir {segmenter_workdir}; the "
                    f"RAS segmenter is trained on that cache's labelled volumes (run "
                    f"--mode=preprocess there first)")
  cache = VolumeCache(cache_path)
  if tuple(cache.grid) != tuple(real.shape[1:]):
    raise DataError(f"{real_paths[0]}: grid {real.shape[1:]} differs from the segmenter's "
                    f"training grid {tuple(cache.grid)} ({cache_path}); the RAS needs a "
                    f"segmenter trained at the evaluated resolution")
  names = cache.label_names()
  seg = seg_lib.ensure_segmenter(config, segmenter_workdir, cache, mesh)
  name = name or os.path.basename(os.path.normpath(generated_dir))
  source = {"generated_dir": os.path.abspath(generated_dir),
            "generated": [os.path.basename(p) for p in gen_paths],
            "real_dir": os.path.abspath(real_dir), "labels_dir": os.path.abspath(real_labels_dir),
            "real": [os.path.basename(p) for p in real_paths],
            "segmenter_workdir": os.path.abspath(segmenter_workdir)}
  return evaluate_volumes(config, generated, real, labels, seg, names, cache.slice_axis, out_dir,
                          name=name, mesh=mesh, extra=source)
