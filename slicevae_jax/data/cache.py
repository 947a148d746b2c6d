"""Volume cache: preprocessing writes it once; training, the latent fit and evaluation read it.

Layout of a cache folder (written by `CacheWriter`, read by `VolumeCache`)::

  manifest.json   subjects (id, source file, split, row, grid affine, voxel
                  sizes), skipped subjects with reasons, slice axis, dtype,
                  label names and the preprocessing settings
  images.npy      [N, S, H, W] slice-major stacks, values in [0, 1]
                  (uint8 caches store round(255 · v))
  labels.npy      [N, S, H, W] uint8 label maps (only when labels were given)

Volumes are RAS-canonical grids `[X, Y, Z]`; a stack is the volume with the
slice axis moved first, so that reading one slice is one contiguous read from
the memory-mapped file. `VolumeCache.volume(i)` undoes the move.

A cache is built in `<cache>.partial/` and renamed into place only when every
subject has been processed, so a cache folder that exists is complete. The
partial folder records finished rows in `progress.jsonl`; a rerun after an
interruption reopens it and skips them.
"""

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Iterable, Sequence

import numpy as np

from slicevae_jax import fileio
from slicevae_jax.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"


def to_stack(volume: np.ndarray, slice_axis: int) -> np.ndarray:
  """[..., X, Y, Z] volume(s) -> [..., S, H, W] stack(s) of slices along `slice_axis`."""
  return np.moveaxis(volume, volume.ndim - 3 + slice_axis, -3)


def to_volume(stack: np.ndarray, slice_axis: int) -> np.ndarray:
  """[..., S, H, W] stack -> [..., X, Y, Z] volume (inverse of `to_stack`)."""
  return np.moveaxis(stack, -3, stack.ndim - 3 + slice_axis)


def _encode(values: np.ndarray, dtype: str) -> np.ndarray:
  values = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
  if dtype == "uint8":
    return np.round(values * 255.0).astype(np.uint8)
  return values.astype(dtype)


def _decode(values: np.ndarray) -> np.ndarray:
  if values.dtype == np.uint8:
    return values.astype(np.float32) * np.float32(1.0 / 255.0)
  return values.astype(np.float32)


def _gather(array: np.ndarray, rows: np.ndarray, slices: np.ndarray) -> np.ndarray:
  """array[rows, slices] from a memory map, read in file order, returned in input order."""
  rows, slices = np.asarray(rows), np.asarray(slices)
  order = np.lexsort((slices, rows))
  out = np.empty((len(rows),) + array.shape[2:], array.dtype)
  out[order] = array[rows[order], slices[order]]
  return out


def plan_hash(entries: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
  """Identifies a cache plan, so a partial cache is only resumed by the same plan."""
  blob = json.dumps({"entries": list(entries), "settings": settings}, sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CacheWriter:
  """Fills a cache row by row; resumable; `finalize()` makes it visible.

  Args:
    path: the final cache folder.
    entries: one dict per row with at least 'id' and 'split' ('train'|'val');
      any other JSON-able fields (e.g. 'source') are kept in the manifest.
    grid: (X, Y, Z) of every volume.
    slice_axis: volume axis slices are taken along.
    dtype: 'float32' | 'float16' | 'uint8'.
    with_labels: allocate labels.npy.
    settings: preprocessing settings recorded in the manifest (and hashed:
      a partial cache made with other settings is discarded, not resumed).
    shard: (k, n): this writer fills rows k, k+n, k+2n, ...; n writers (processes
      or hosts on one file system) fill one cache together, and whichever sees
      every row done calls `finalize()`.
  """

  def __init__(self, path: str, entries: Sequence[dict[str, Any]], grid: Sequence[int],
               slice_axis: int, dtype: str, with_labels: bool,
               settings: dict[str, Any] | None = None,
               shard: tuple[int, int] | None = None):
    self.path = os.path.abspath(path)
    self.partial = self.path + ".partial"
    self.entries = [dict(e) for e in entries]
    if not self.entries:
      raise DataError(f"{self.path}: no subjects to write into the cache")
    self.grid = tuple(int(g) for g in grid)
    self.slice_axis = int(slice_axis)
    self.dtype = dtype
    self.with_labels = with_labels
    self.settings = dict(settings or {})
    self.hash = plan_hash(self.entries, {**self.settings, "grid": self.grid,
                                         "slice_axis": self.slice_axis, "dtype": dtype,
                                         "labels": with_labels})
    self.shard, self.num_shards = (int(shard[0]), int(shard[1])) if shard else (0, 1)
    if not 0 <= self.shard < self.num_shards:
      raise DataError(f"{self.path}: shard {self.shard} of {self.num_shards} does not exist")
    n = len(self.entries)
    self._stack_shape = (n,) + to_stack(np.empty(self.grid, np.uint8), self.slice_axis).shape
    self.done: dict[int, dict[str, Any]] = {}
    plan_file = os.path.join(self.partial, "plan.json")
    if os.path.isdir(self.partial):
      try:
        resumable = fileio.read_json(plan_file)["hash"] == self.hash
      except (OSError, ValueError, KeyError):
        resumable = False
      if not resumable:
        shutil.rmtree(self.partial)
    if not os.path.isdir(self.partial):
      self._create_partial()
    self.images = np.load(os.path.join(self.partial, "images.npy"), mmap_mode="r+")
    self.labels = (np.load(os.path.join(self.partial, "labels.npy"), mmap_mode="r+")
                   if with_labels else None)
    self._read_progress()

  def _create_partial(self) -> None:
    """Allocates the arrays in a private folder, then renames it into place.

    Several shards (processes or hosts sharing a file system) may start at
    once: the first rename wins and the others use the winner's folder.
    """
    tmp = f"{self.partial}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
      np.lib.format.open_memmap(os.path.join(tmp, "images.npy"), mode="w+",
                                dtype=np.dtype(self.dtype), shape=self._stack_shape).flush()
      if self.with_labels:
        np.lib.format.open_memmap(os.path.join(tmp, "labels.npy"), mode="w+", dtype=np.uint8,
                                  shape=self._stack_shape).flush()
      fileio.write_json(os.path.join(tmp, "plan.json"), {"hash": self.hash})
      os.rename(tmp, self.partial)
    except OSError:
      if not os.path.isdir(self.partial):
        raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  def _progress_file(self) -> str:
    name = PROGRESS if self.num_shards == 1 else f"progress-{self.shard}-of-{self.num_shards}.jsonl"
    return os.path.join(self.partial, name)

  def _read_progress(self) -> None:
    """Finished rows, from every shard's progress file."""
    for name in sorted(os.listdir(self.partial)):
      if not (name.startswith("progress") and name.endswith(".jsonl")):
        continue
      with open(os.path.join(self.partial, name), "r", encoding="utf-8") as f:
        for line in f:
          try:
            rec = json.loads(line)
          except ValueError:
            continue  # a line cut short by an interruption: that row is redone
          self.done[int(rec["row"])] = rec

  @property
  def complete(self) -> bool:
    """True when every row of every shard is written or skipped (re-reads progress)."""
    self._read_progress()
    return len(self.done) == len(self.entries)

  @property
  def pending(self) -> list[int]:
    """This shard's rows not yet written (nor skipped)."""
    return [i for i in range(self.shard, len(self.entries), self.num_shards)
            if i not in self.done]

  def write(self, row: int, image: np.ndarray, affine: np.ndarray,
            labels: np.ndarray | None = None, **meta: Any) -> None:
    """Stores one preprocessed volume [X, Y, Z] in [0, 1] with its grid affine."""
    image = np.asarray(image)
    if image.shape != self.grid:
      raise DataError(f"{self.entries[row]['id']}: preprocessed shape {image.shape} "
                      f"!= cache grid {self.grid}")
    self.images[row] = _encode(to_stack(image, self.slice_axis), self.dtype)
    if self.labels is not None:
      if labels is None:
        raise DataError(f"{self.entries[row]['id']}: this cache holds labels but none were given")
      self.labels[row] = to_stack(np.asarray(labels), self.slice_axis).astype(np.uint8)
    self.images.flush()
    if self.labels is not None:
      self.labels.flush()
    self._record({"row": row, "status": "ok",
                  "affine": np.asarray(affine, np.float64).tolist(), **meta})

  def skip(self, row: int, reason: str) -> None:
    """Marks a row as a bad subject, listed in the manifest's `skipped`."""
    self._record({"row": row, "status": "skipped", "reason": str(reason)})

  def _record(self, rec: dict[str, Any]) -> None:
    with open(self._progress_file(), "a", encoding="utf-8") as f:
      f.write(json.dumps(rec, default=fileio.json_default) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.done[int(rec["row"])] = rec

  def finalize(self, extra: dict[str, Any] | None = None) -> "VolumeCache":
    """Writes the manifest and renames the partial folder into place."""
    if not self.complete:
      missing = len(self.entries) - len(self.done)
      raise DataError(f"{self.path}: {missing} subjects not yet processed")
    subjects, skipped = [], []
    for row, entry in enumerate(self.entries):
      rec = self.done[row]
      if rec["status"] == "ok":
        subjects.append({**entry, **{k: v for k, v in rec.items() if k != "status"}})
      else:
        skipped.append({**entry, "row": row, "reason": rec["reason"]})
    if not subjects:
      raise DataError(f"{self.path}: every subject failed preprocessing; first: "
                      f"{skipped[0]['id']}: {skipped[0]['reason']}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "grid": list(self.grid),
        "slice_axis": self.slice_axis,
        "dtype": self.dtype,
        "has_labels": self.with_labels,
        "num_rows": len(self.entries),
        "subjects": subjects,
        "skipped": skipped,
        "settings": self.settings,
        **(extra or {}),
    }
    del self.images, self.labels
    try:
      fileio.write_json(os.path.join(self.partial, MANIFEST), manifest)
      if os.path.exists(self.path):
        shutil.rmtree(self.path)
      os.replace(self.partial, self.path)
    except OSError:
      # Another shard finished the same plan a moment earlier.
      if not VolumeCache.exists(self.path):
        raise
    return VolumeCache(self.path)


class VolumeCache:
  """Read-only view of a finished cache; arrays are memory-mapped."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    manifest = os.path.join(self.path, MANIFEST)
    if not os.path.isfile(manifest):
      hint = " (an unfinished cache exists; rerun preprocessing to resume it)" \
        if os.path.isdir(self.path + ".partial") else ""
      raise DataError(f"{self.path}: not a preprocessed cache, {MANIFEST} missing{hint}")
    self.manifest = fileio.read_json(manifest)
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise DataError(f"{manifest}: cache format {self.manifest.get('format_version')} "
                      f"!= {FORMAT_VERSION}; rerun preprocessing")
    self.images = np.load(os.path.join(self.path, "images.npy"), mmap_mode="r")
    self.labels = (np.load(os.path.join(self.path, "labels.npy"), mmap_mode="r")
                   if self.manifest["has_labels"] else None)
    self.subjects: list[dict[str, Any]] = self.manifest["subjects"]
    self.slice_axis: int = self.manifest["slice_axis"]
    self.grid: tuple[int, ...] = tuple(self.manifest["grid"])

  @staticmethod
  def exists(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))

  def __len__(self) -> int:
    return len(self.subjects)

  @property
  def stack_shape(self) -> tuple[int, int, int]:
    """(S, H, W) of one subject's stack."""
    return tuple(self.images.shape[1:])

  def split(self, name: str) -> list[int]:
    """Subject indices (into `subjects`) of split 'train' or 'val'."""
    return [i for i, s in enumerate(self.subjects) if s["split"] == name]

  def rows(self, subjects: Iterable[int]) -> np.ndarray:
    """Array rows of the given subject indices."""
    return np.asarray([self.subjects[i]["row"] for i in subjects], np.int64)

  def stack(self, i: int) -> np.ndarray:
    """Subject i as a float32 [S, H, W] stack in [0, 1]."""
    return _decode(self.images[self.subjects[i]["row"]])

  def volume(self, i: int) -> np.ndarray:
    """Subject i as a float32 [X, Y, Z] RAS volume in [0, 1]."""
    return to_volume(self.stack(i), self.slice_axis)

  def volume_at_row(self, row: int) -> np.ndarray:
    """The volume stored in array row `row` (see `rows`), float32 [X, Y, Z] in [0, 1]."""
    return to_volume(_decode(self.images[row]), self.slice_axis)

  def label_volume(self, i: int) -> np.ndarray:
    if self.labels is None:
      raise DataError(f"{self.path}: this cache has no labels")
    return to_volume(np.asarray(self.labels[self.subjects[i]["row"]]), self.slice_axis)

  def gather(self, rows: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """float32 [B, H, W] slices at (array row, slice index) pairs."""
    return _decode(_gather(self.images, rows, slices))

  def gather_labels(self, rows: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W] label slices at (array row, slice index) pairs."""
    if self.labels is None:
      raise DataError(f"{self.path}: this cache has no labels")
    return _gather(self.labels, rows, slices)

  def label_names(self) -> list[str]:
    """The label names, background first; DataError if the cache holds no labels (the RAS
    segmenter trains on them and the evaluation scores against them)."""
    names = self.manifest.get("label_names")
    if not self.manifest.get("has_labels") or not names:
      raise DataError(f"{self.path}: the RAS segmenter and the evaluation need labelled "
                      f"volumes, and this cache has no labels (give label files: HCP "
                      f"aparc+aseg or data.labels_dir)")
    return list(names)

  def held_out(self, limit: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(volumes [M, X, Y, Z], label maps, label names) of the 'val' split, the first `limit`
    (0: all): the real set the evaluation scores against."""
    names = self.label_names()
    val = self.split("val")
    if not val:
      raise DataError(f"{self.path}: no held-out ('val') volumes to evaluate against; set "
                      f"data.num_val > 0")
    val = val[:limit] if limit else val
    return (np.stack([self.volume(i) for i in val]),
            np.stack([self.label_volume(i) for i in val]), names)

  def affine(self, i: int) -> np.ndarray:
    return np.asarray(self.subjects[i]["affine"], np.float64)

  def reference_affine(self, subjects: Sequence[int]) -> np.ndarray:
    """A grid affine for generated volumes: shared rotation/zooms, mean translation."""
    affines = np.stack([self.affine(i) for i in subjects])
    out = affines[0].copy()
    out[:3, 3] = affines[:, :3, 3].mean(axis=0)
    return out

  @property
  def voxel_size(self) -> tuple[float, ...]:
    a = self.affine(0)[:3, :3]
    return tuple(float(v) for v in np.sqrt((a ** 2).sum(axis=0)))
