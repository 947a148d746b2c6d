"""Real data -> cache: NIfTI folders -> (N4, percentile scaling, one resampling) -> VolumeCache.

This is the first stage of the pipeline for `data.source='nifti'` (paper §3.2, the
HCP recipe): `subjects.find_subjects` lists the volumes, `preprocess_volume` turns
one volume into a grid³ RAS array in [0, 1] with its grid affine, and `build_cache`
runs it over every subject in worker processes and fills a `CacheWriter` that
training, latent fitting and evaluation read.

Workers are started with 'spawn' and this module does not import JAX, so no
process that has initialised JAX is ever forked. As with any 'spawn' pool, a
script that calls `build_cache` with `data.num_workers > 1` must do so under
`if __name__ == "__main__":` (main.py does; notebooks need nothing), because each
worker re-imports the main script.
"""

import collections
import concurrent.futures as futures
import multiprocessing
import os
import shutil
import sys
import time
import traceback
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.ndimage as ndi
import tqdm
from absl import logging

from slicevae_jax.data import labels as label_sets
from slicevae_jax.data import nifti
from slicevae_jax.data import subjects as subjects_lib
from slicevae_jax.data.cache import CacheWriter, VolumeCache
from slicevae_jax.data.intensity import normalize_percentiles
from slicevae_jax.errors import ConfigError, DataError

# Bumped when the pipeline changes what it writes: part of the cache plan hash,
# so a partial cache made by older code is rebuilt, not resumed.
PREPROCESS_VERSION = 1

# --------------------------------------------------------------------------
# One volume
# --------------------------------------------------------------------------


def n4_correct(data: np.ndarray, affine: np.ndarray, *, mask: np.ndarray | None = None,
               shrink: int = 4,
               iterations: Sequence[int] = (50, 50, 30, 20)) -> np.ndarray:
  """N4 bias-field correction (SimpleITK), fitted on a shrunk copy for speed.

  Args:
    data: [X, Y, Z] intensities (negative values are treated as 0).
    affine: its 4x4 affine; the voxel sizes set the B-spline's physical spacing.
    mask: voxels to fit on; default the non-zero voxels (skull-stripped input),
      or an Otsu foreground when the volume has no zeros.
    shrink: the field is fitted on every `shrink`-th voxel per axis, then
      evaluated at full resolution.
    iterations: maximum iterations per fitting level (its length = levels).
  Returns:
    float32 [X, Y, Z]: data / bias field; zeros stay zero.
  """
  # Imported here: SimpleITK is only needed with data.n4=True.
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel

  data = np.maximum(np.asarray(data, np.float32), 0.0)
  # numpy [X, Y, Z] is ITK's [z, y, x] array order, so transpose in and out.
  img = sitk.GetImageFromArray(np.ascontiguousarray(data.T))
  img.SetSpacing(tuple(float(s) for s in nifti.voxel_sizes(affine)))
  if mask is None:
    mask = data > 0
  if mask.all() or not mask.any():
    mask_img = sitk.OtsuThreshold(img, 0, 1, 200)
  else:
    mask_img = sitk.GetImageFromArray(np.ascontiguousarray(mask.T.astype(np.uint8)))
    mask_img.CopyInformation(img)
  # Keep a few voxels per axis after shrinking, or the B-spline fit has no support.
  shrink = int(max(1, min(shrink, min(data.shape) // 8)))
  small, small_mask = img, mask_img
  if shrink > 1:
    small = sitk.Shrink(img, [shrink] * 3)
    small_mask = sitk.Shrink(mask_img, [shrink] * 3)
  corrector = sitk.N4BiasFieldCorrectionImageFilter()
  corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
  corrector.Execute(small, small_mask)
  log_bias = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(img)).T
  return (data / np.exp(log_bias)).astype(np.float32)


def _nonzero_box(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """First and last index of non-zero voxels per axis, int [3] each."""
  lo, hi = [], []
  for axis in range(3):
    other = tuple(a for a in range(3) if a != axis)
    idx = np.flatnonzero(np.any(data != 0, axis=other))
    lo.append(idx[0])
    hi.append(idx[-1])
  return np.asarray(lo), np.asarray(hi)


# A brain whose bounding box is smaller than this share of the field of view
# (grid x voxel_size) on every axis is no brain at that voxel size: a 4-voxel test
# file, or a header in metres instead of mm. Generous on purpose, so small or
# tightly cropped fields of view still pass.
MIN_EXTENT_FRACTION = 0.125


def check_extent(data: np.ndarray, affine: np.ndarray, grid: int, voxel_size: float) -> None:
  """Refuses a volume whose non-zero extent (mm) is implausibly small for the grid (DataError)."""
  lo, hi = _nonzero_box(data)
  extent = (hi - lo + 1) * nifti.voxel_sizes(affine)
  fov = float(grid) * float(voxel_size)
  if extent.max() < MIN_EXTENT_FRACTION * fov:
    size = " x ".join(f"{e:.1f}" for e in extent)
    raise DataError(
        f"brain extent {size} mm (non-zero voxels, shape {tuple(data.shape)}) is implausibly "
        f"small for the field of view of {fov:.0f} mm (data.grid {grid} x data.voxel_size "
        f"{voxel_size} mm; at least {MIN_EXTENT_FRACTION * fov:.0f} mm expected): check the "
        f"voxel sizes in the header (mm, not m) and that this is a brain volume")


def grid_transform(data: np.ndarray, affine: np.ndarray, grid: int,
                   voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
  """Where the grid³ output sits in the input: (scale f [3], offset [3]).

  Output voxel o samples input voxel index f * o + offset. The grid is centred
  on the bounding box of non-zero voxels (zero-filled planes are dropped, as in
  the HCP recipe), axes aligned with the input's.
  """
  if not np.any(data):
    raise DataError("volume is all zeros (nothing to centre the grid on)")
  f = float(voxel_size) / nifti.voxel_sizes(affine)
  lo, hi = _nonzero_box(data)
  centre = (lo + hi) / 2.0
  # Rounded to whole input voxels, so an axis at unchanged spacing is copied
  # without interpolation; the grid centre moves by at most half an input voxel.
  offset = np.round(centre - f * (grid - 1) / 2.0)
  return f, offset


def preprocess_volume(data: np.ndarray, affine: np.ndarray, *, grid: int, voxel_size: float,
                      n4: bool = False, percentiles: Sequence[float] = (1.0, 99.0),
                      foreground_percentiles: bool = True, antialias: bool = True,
                      labels: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
  """One subject: N4 -> percentile scaling -> one crop/pad + resampling to grid³.

  Args:
    data: [X, Y, Z] intensities, RAS-canonical (as `nifti.load_volume` gives).
    affine: its 4x4 voxel -> world (mm) affine.
    grid: output size per axis.
    voxel_size: output spacing in mm, isotropic.
    n4: N4 bias-field correction before scaling.
    percentiles: (low, high) mapped to 0 and 1 (`normalize_percentiles`).
    foreground_percentiles: percentiles over non-zero voxels only.
    antialias: Gaussian pre-filter along axes that are downsampled, sigma =
      sqrt(f² - 1) / 2 input voxels with f = output / input spacing.
    labels: optional [X, Y, Z] integer labels in 0..255 on the same grid as
      `data` (already grouped); resampled by nearest neighbour, never filtered.
  Returns:
    image float32 [grid, grid, grid] in [0, 1] (zero outside the input),
    labels uint8 [grid, grid, grid] or None,
    grid_affine float64 [4, 4]: output voxel -> the same world mm as `affine`
    (so the output overlays the input in a viewer); its voxel size is `voxel_size`.
  Raises:
    DataError: not 3D, all zeros, labels on another grid or outside 0..255, or a
      brain implausibly small for the field of view (`check_extent`).
  """
  data = np.asarray(data, np.float32)
  affine = np.asarray(affine, np.float64)
  if data.ndim != 3:
    raise DataError(f"expected a 3D volume, got shape {data.shape}")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != data.shape:
      raise DataError(f"label map shape {labels.shape} != image shape {data.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
      raise DataError(f"label values span [{labels.min()}, {labels.max()}]; expected 0..255")
  f, offset = grid_transform(data, affine, grid, voxel_size)
  check_extent(data, affine, grid, voxel_size)
  image = data
  if n4:
    image = n4_correct(image, affine)
  image = normalize_percentiles(image, tuple(percentiles), foreground=foreground_percentiles)

  sigma = np.sqrt(np.maximum(f ** 2 - 1.0, 0.0)) / 2.0 if antialias else np.zeros(3)
  # Only the part of the input the grid (plus the filter's reach) touches is
  # filtered and sampled; for a 0.7 mm HCP volume at 64³ that is most of it, for
  # a small field of view much less.
  reach = np.ceil(4.0 * sigma) + 2
  start = np.maximum(offset - reach, 0).astype(int)
  stop = np.minimum(offset + f * (grid - 1) + reach + 1, data.shape).astype(int)
  if np.any(stop <= start):
    raise DataError("the output grid does not overlap the volume")  # cannot happen: centred
  crop = tuple(slice(a, b) for a, b in zip(start, stop))
  image = image[crop]
  local_offset = offset - start
  if np.any(sigma > 0):
    # mode='constant': zero outside the input, like the resampling below.
    image = ndi.gaussian_filter(image, sigma, mode="constant", cval=0.0)
  out_shape = (grid,) * 3
  image = ndi.affine_transform(image, f, offset=local_offset, output_shape=out_shape,
                               order=1, mode="constant", cval=0.0, prefilter=False)
  image = np.clip(image, 0.0, 1.0).astype(np.float32)
  out_labels = None
  if labels is not None:
    out_labels = ndi.affine_transform(labels[crop].astype(np.uint8), f, offset=local_offset,
                                      output_shape=out_shape, order=0, mode="constant",
                                      cval=0, prefilter=False).astype(np.uint8)
  # Output index o -> input index f * o + offset -> world through `affine`.
  to_input = np.eye(4)
  to_input[:3, :3] = np.diag(f)
  to_input[:3, 3] = offset
  return image, out_labels, affine @ to_input


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------


def _check_usable(writer: CacheWriter, entries: list[dict[str, Any]], d: Any) -> None:
  """Stops (DataError) when no subject, or no held-out subject, was preprocessed.

  The partial cache is removed first: its skipped rows count as done, so a rerun
  after the files are fixed would skip them again instead of retrying.
  """
  ok = [row for row, rec in writer.done.items() if rec["status"] == "ok"]
  val = [row for row, e in enumerate(entries) if e["split"] == "val"]
  reasons = [writer.done[row].get("reason", "") for row in sorted(writer.done)
             if writer.done[row]["status"] != "ok"]
  if not ok:
    msg = (f"{d.root}: every one of the {len(entries)} subjects was skipped, so there is "
           f"nothing to train on (the first: {reasons[0]}; each is logged above); fix those "
           f"files or set data.root to other data")
  elif not set(val) & set(ok):
    ids = [entries[row]["id"] for row in val]
    msg = (f"{d.root}: the validation split is empty: its subjects {ids} were all skipped "
           f"(each is logged above); fix those files, or raise data.num_val (now "
           f"{d.num_val}) so that held-out subjects remain")
  else:
    return
  shutil.rmtree(writer.partial, ignore_errors=True)
  raise DataError(msg)


def settings(d: Any) -> dict[str, Any]:
  """The preprocessing settings of config group `data`: recorded in the manifest, hashed
  into the plan, checked on reuse."""
  return {
      "preprocess_version": PREPROCESS_VERSION,
      "grid": int(d.grid),
      "voxel_size": float(d.voxel_size),
      "n4": bool(d.n4),
      "percentiles": [float(p) for p in d.percentiles],
      "foreground_percentiles": bool(d.foreground_percentiles),
      "antialias": bool(d.antialias),
      "label_map": str(d.label_map),
  }


def split_subjects(num: int, num_val: int, seed: int,
                   groups: Sequence[Any] | None = None) -> list[str]:
  """'train'/'val' per subject: `num_val` (at most num - 1) chosen by a seeded permutation.

  With `groups` (one per subject: the participant of each BIDS session), whole groups are
  held out in a seeded order until at least `num_val` subjects are, and at least one group
  stays for training, so no person is in both splits. Without, every subject is its own
  group (the same split as a permutation of the subjects).
  """
  groups = list(range(num)) if groups is None else list(groups)
  order = list(dict.fromkeys(groups))                  # groups in order of first appearance
  sizes = collections.Counter(groups)
  num_val = max(0, min(int(num_val), num - 1))
  val, count = set(), 0
  for i in np.random.default_rng(int(seed)).permutation(len(order))[: len(order) - 1]:
    if count >= num_val:
      break
    val.add(order[i])
    count += sizes[order[i]]
  return ["val" if g in val else "train" for g in groups]


def _process_subject(task: dict[str, Any]) -> dict[str, Any]:
  """Loads and preprocesses one subject; never raises (errors come back as a reason).

  Runs in a worker process: only numpy/scipy/nibabel/SimpleITK, no JAX.
  """
  path = task["image"]
  warnings = []
  try:
    s = task["settings"]
    if not nifti.orientation_known(path):
      guessed = (f"{path}: the header sets neither qform nor sform, so the orientation "
                 f"(left/right, anterior/posterior) is guessed from the voxel sizes")
      if task.get("strict"):
        raise DataError(guessed + "; set the orientation (e.g. fslorient or nibabel) or "
                        "set data.strict=False to accept the guess")
      warnings.append(guessed)
    data, affine = nifti.load_volume(path)
    labels = None
    if task["labels"]:
      raw, lab_affine = nifti.load_labels(task["labels"])
      if raw.shape != data.shape:
        raise DataError(f"{task['labels']}: label map grid {raw.shape} differs from its image "
                        f"{path} ({data.shape}); labels must be on the image's voxel grid")
      if not np.allclose(lab_affine, affine, atol=1e-3):
        raise DataError(f"{task['labels']}: label map affine differs from its image {path} "
                        f"(max difference {np.abs(lab_affine - affine).max():.3g} mm); labels "
                        f"must be on the image's voxel grid")
      labels = label_sets.map_labels(raw, s["label_map"], task["labels"])
    image, labels, grid_affine = preprocess_volume(
        data, affine, grid=s["grid"], voxel_size=s["voxel_size"], n4=s["n4"],
        percentiles=s["percentiles"], foreground_percentiles=s["foreground_percentiles"],
        antialias=s["antialias"], labels=labels)
    meta = {"voxel_size_in": nifti.voxel_sizes(affine).tolist(),
            "shape_in": list(data.shape)}
    if labels is not None:
      meta["label_max"] = int(labels.max())
    return {"row": task["row"], "status": "ok", "image": image, "labels": labels,
            "affine": grid_affine, "meta": meta, "warnings": warnings}
  except DataError as e:
    reason = str(e)
    if path not in reason and (not task["labels"] or task["labels"] not in reason):
      reason = f"{path}: {reason}"
    return {"row": task["row"], "status": "error", "reason": reason}
  except Exception as e:  # pylint: disable=broad-except
    # Anything else is reported with the file too; strict mode re-raises it.
    return {"row": task["row"], "status": "error",
            "reason": f"{path}: {type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _run(tasks: list[dict[str, Any]], num_workers: int) -> Iterator[dict[str, Any]]:
  """Yields results of `_process_subject`, inline or from worker processes."""
  if num_workers <= 1 or len(tasks) <= 1:
    for task in tasks:
      yield _process_subject(task)
    return
  # 'spawn': a fresh interpreter per worker; forking a parent that has
  # initialised JAX (threads, device handles) can deadlock.
  ctx = multiprocessing.get_context("spawn")
  pool = futures.ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx)
  try:
    todo = iter(tasks)
    running: set[futures.Future] = set()
    # A bounded window: results (grid³ arrays) are written as they arrive
    # instead of piling up in the parent.
    for task in todo:
      running.add(pool.submit(_process_subject, task))
      if len(running) >= 2 * num_workers:
        break
    while running:
      done, running = futures.wait(running, return_when=futures.FIRST_COMPLETED)
      for fut in done:
        nxt = next(todo, None)
        if nxt is not None:
          running.add(pool.submit(_process_subject, nxt))
        yield fut.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def build_cache(config: Any, cache_dir: str, *, overwrite: bool = False,
                shard: tuple[int, int] | None = None) -> VolumeCache | None:
  """Preprocesses every subject under `config.data.root` into a cache at `cache_dir`.

  Reads `config.seed` and `config.data.*` (root, layout, hcp_image, hcp_labels,
  labels_dir, label_map, cache_dtype, grid, voxel_size, slice_axis, n4,
  percentiles, foreground_percentiles, antialias, num_val, max_subjects, strict,
  num_workers).

  Subjects are sorted by id, cut to `max_subjects`, and split by a permutation
  seeded with `config.seed`: `num_val` (at most all but one) go to 'val'. The
  cache holds labels iff every subject has a label file. A subject that fails
  is logged and listed in the manifest's `skipped`, or, with `data.strict`,
  raises DataError naming its file. An interrupted build resumes where it
  stopped (CacheWriter's progress file); a finished cache at `cache_dir` is
  returned as it is unless `overwrite`.

  With `shard=(k, n)` (default: `data.shard_index`, `data.num_shards`) this call
  processes only rows k, k+n, ... of the shared plan; n calls (processes, hosts
  or batch jobs sharing a file system) fill one cache, and whichever finds every
  row done finalises it. The split is computed from the whole subject list, so a
  sharded cache equals an unsharded one.

  Returns:
    the finished VolumeCache, or None when other shards still have rows to do.
  """
  d = config.data
  recipe = settings(d)
  if VolumeCache.exists(cache_dir) and not overwrite:
    cache = VolumeCache(cache_dir)
    if cache.manifest.get("settings") != recipe:
      logging.warning("%s: existing cache was made with other settings (%s); using it as "
                      "it is. Delete it or pass overwrite=True to rebuild.",
                      cache.path, cache.manifest.get("settings"))
    return cache

  subjects = subjects_lib.find_subjects(d.root, d.layout, hcp_image=d.hcp_image,
                                        hcp_labels=d.hcp_labels, labels_dir=d.labels_dir,
                                        bids_desc=d.bids_desc)
  if int(d.max_subjects) > 0:
    subjects = subjects[: int(d.max_subjects)]
  listed_split = subjects[0].split is not None
  if int(d.num_val) < 1 and not listed_split:
    raise ConfigError(f"config key 'data.num_val' is {d.num_val}: training and evaluation "
                      f"need held-out volumes; set data.num_val to 1 or more")
  if len(subjects) < 2:
    raise DataError(f"{d.root}: {len(subjects)} subject found; at least 2 are needed (one to "
                    f"train on, one held out)")
  num_labelled = sum(s.labels is not None for s in subjects)
  with_labels = num_labelled == len(subjects)
  if 0 < num_labelled < len(subjects):
    missing = [s.id for s in subjects if s.labels is None]
    msg = (f"{d.root}: {num_labelled} of {len(subjects)} subjects have label files "
           f"(none for {missing[:5]}{'...' if len(missing) > 5 else ''})")
    if d.strict:
      raise DataError(msg + "; give labels for all subjects or none")
    logging.warning("%s; the cache will hold no labels", msg)

  splits = split_subjects(len(subjects), d.num_val, config.seed,
                          [s.group or s.id for s in subjects])
  if listed_split:
    # The subject list fixes the split by hand (CSV split column): data.num_val is unused.
    splits = [s.split for s in subjects]
    for name in ("train", "val"):
      if name not in splits:
        raise DataError(f"{d.root}: no row has split '{name}'; training needs both 'train' "
                        f"and held-out 'val' subjects")
    logging.info("%s: split as listed (%d train, %d val); data.num_val is not used", d.root,
                 splits.count("train"), splits.count("val"))
  entries = [{"id": s.id, "source": s.image, "labels": s.labels if with_labels else None,
              "split": split, **({"participant": s.group} if s.group else {})}
             for s, split in zip(subjects, splits)]
  g = int(d.grid)
  if shard is None:
    shard = (int(d.shard_index), int(d.num_shards))
  writer = CacheWriter(cache_dir, entries, (g, g, g), int(d.slice_axis), str(d.cache_dtype),
                       with_labels, recipe, shard=shard)
  pending = writer.pending
  logging.info("preprocessing %d of %d subjects from %s into %s (%d workers)",
               len(pending), len(entries), d.root, writer.path, int(d.num_workers))
  # `strict` travels beside the settings: it decides what is refused, not what is
  # written, so it stays out of the plan hash.
  tasks = [{"row": row, "image": entries[row]["source"], "labels": entries[row]["labels"],
            "settings": recipe, "strict": bool(d.strict)} for row in pending]
  t0 = time.time()
  # disable=None: the bar shows on a terminal and stays out of log files.
  with tqdm.tqdm(total=len(entries), initial=len(entries) - len(pending), unit="vol",
                 desc="preprocess", disable=None, file=sys.stderr) as bar:
    for result in _run(tasks, int(d.num_workers)):
      row = result["row"]
      if result["status"] == "ok":
        # Logged here, not in the worker: spawned workers have no log set-up.
        for warning in result["warnings"]:
          logging.warning("%s", warning)
        writer.write(row, result["image"], result["affine"], result["labels"],
                     **result["meta"])
      else:
        if d.strict:
          raise DataError(f"{result['reason']} (data.strict=True stops at the first bad "
                          f"subject; set it False to skip bad subjects)")
        if "traceback" in result:
          logging.debug("%s", result["traceback"])
        logging.warning("skipping subject %s: %s", entries[row]["id"], result["reason"])
        writer.skip(row, result["reason"])
      bar.update(1)

  if not writer.complete:
    logging.info("shard %d of %d done; %d subjects left to other shards of %s", shard[0],
                 shard[1], len(entries) - len(writer.done), writer.partial)
    return None
  _check_usable(writer, entries, d)

  label_names = None
  if with_labels:
    if d.label_map == "freesurfer15":
      label_names = list(label_sets.FREESURFER15_NAMES)
    else:
      # Raw labels have no names: one class per value up to the largest seen.
      top = max((rec.get("label_max", 0) for rec in writer.done.values()
                 if rec["status"] == "ok"), default=0)
      label_names = [f"label_{i}" for i in range(int(top) + 1)]
  cache = writer.finalize(extra={"label_names": label_names, "source": "nifti",
                                 "root": os.path.abspath(d.root), "layout": str(d.layout)})
  skipped = cache.manifest["skipped"]
  logging.info("cache %s: %d subjects (%d train, %d val), %d skipped, %.1f s",
               cache.path, len(cache), len(cache.split("train")), len(cache.split("val")),
               len(skipped), time.time() - t0)
  return cache
