"""NIfTI I/O: files -> arrays + affines at the head of the data flow, samples -> files at its end.

Everything downstream works on RAS-canonical arrays `[X, Y, Z]` with a 4x4 voxel ->
world (mm) affine. Loading checks the things that otherwise fail far away and
obscurely (a truncated download, a 4D series, NaNs) and names the file at fault.
"""

import glob
import gzip
import os
import struct
import zlib

import nibabel as nib
import numpy as np
from absl import logging
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from slicevae_jax import fileio
from slicevae_jax.data import intensity
from slicevae_jax.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# What nibabel, gzip and zlib raise on files that are not NIfTI, are truncated
# or are corrupt. nibabel reads lazily, so these surface when the data are read.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error,
                gzip.BadGzipFile, struct.error, ValueError, TypeError)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
  """Voxel edge lengths in mm, float64 [3]: the column norms of the 3x3 part."""
  a = np.asarray(affine, np.float64)[:3, :3]
  return np.sqrt((a ** 2).sum(axis=0))


def _read(path: str | os.PathLike, what: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a 3D NIfTI (or 4D with one volume) into memory: (data [X, Y, Z], affine)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(f"{path}: {what} file does not exist")
  if not os.path.isfile(path):
    raise DataError(f"{path}: {what} path is not a file")
  try:
    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
      raise DataError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
      raise DataError(f"{path}: {what} has {len(shape)} dimensions (shape {shape}); "
                      f"expected a 3D volume")
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
      raise DataError(f"{path}: {what} is {len(shape)}D with shape {shape}; expected one 3D "
                      f"volume (extract it first, e.g. fslroi or nibabel slicing)")
    affine = np.asarray(img.affine, np.float64)
    # Force the (lazy) read here so that truncated/corrupt data raise inside the try.
    data = np.asanyarray(img.dataobj)
    data = np.asarray(data).reshape(shape[:3])
  except DataError:
    raise
  except MemoryError:
    raise
  except _READ_ERRORS as e:
    raise DataError(f"{path}: cannot read {what} as NIfTI ({type(e).__name__}: {e}); "
                    f"the file may be truncated, corrupt or not a NIfTI file") from e
  if data.dtype.kind == "c":
    # Casting to real would drop the imaginary part with only a NumPy warning.
    raise DataError(f"{path}: {what} is complex-valued ({data.dtype}); save its magnitude "
                    f"(or real part) as a real-valued NIfTI first")
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise DataError(f"{path}: degenerate voxel-to-world affine {affine.tolist()}")
  if data.dtype.kind in "fc":
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
      raise DataError(f"{path}: {what} has {bad} non-finite (NaN/Inf) voxels of {data.size}")
  return data, affine


def orientation_known(path: str | os.PathLike) -> bool:
  """Whether the header sets a qform or an sform (reads the header only).

  With neither, nibabel builds the affine from the voxel sizes alone, so which way
  is left, anterior or superior is a guess (the NIfTI 'method 1' fallback).
  """
  path = os.fspath(path)
  try:
    header = nib.load(path).header
    return int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
  except _READ_ERRORS as e:
    raise DataError(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e


def _to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reorients to the closest RAS axes; world coordinates of every voxel are kept."""
  img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
  return np.ascontiguousarray(np.asanyarray(img.dataobj)), np.asarray(img.affine, np.float64)


def load_volume(path: str | os.PathLike, *, canonical: bool = True,
                dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
  """Loads an intensity volume.

  Args:
    path: a .nii or .nii.gz file holding one 3D volume (a trailing singleton
      4th dimension is squeezed).
    canonical: reorient to RAS (`nib.as_closest_canonical`): axis permutations
      and flips only, so no interpolation happens; the affine follows.
    dtype: dtype of the returned array (scl_slope/inter are applied first).
  Returns:
    (data [X, Y, Z] of `dtype`, affine float64 [4, 4] voxel -> world mm).
  Raises:
    DataError naming the file: missing, unreadable/truncated, not NIfTI, not 3D,
    complex-valued, NaN/Inf voxels, degenerate affine.
  """
  data, affine = _read(path, "volume")
  if canonical:
    data, affine = _to_canonical(data, affine)
  return np.ascontiguousarray(data, dtype=dtype), affine


def load_labels(path: str | os.PathLike, *,
                canonical: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Loads an integer label map (e.g. FreeSurfer aseg).

  Returns:
    (labels int32 [X, Y, Z], affine float64 [4, 4]).
  Raises:
    DataError naming the file, as `load_volume`, and when values are not integers
    or do not fit int32.
  """
  path = os.fspath(path)
  data, affine = _read(path, "label map")
  if data.dtype.kind in "fc":
    # Label maps saved as float (or with scaling) are fine if every value is whole.
    frac = int(np.count_nonzero(data != np.round(data)))
    if frac:
      raise DataError(f"{path}: label map has {frac} voxels with non-integer values; "
                      f"labels must be integer codes")
  if data.size and (data.min() < np.iinfo(np.int32).min or data.max() > np.iinfo(np.int32).max):
    raise DataError(f"{path}: label values [{data.min()}, {data.max()}] do not fit int32")
  data = data.astype(np.int32)
  if canonical:
    data, affine = _to_canonical(data, affine)
  return np.ascontiguousarray(data, dtype=np.int32), affine


def save_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *,
                dtype=np.float32) -> None:
  """Writes `data` [X, Y, Z] as .nii or .nii.gz (from the name), atomically.

  qform and sform both hold `affine` (qform drops any shear, the sform keeps it),
  the voxel sizes in the header are the affine's column norms, units mm.
  """
  path = os.fspath(path)
  if path.endswith(".nii.gz"):
    suffix = ".nii.gz"
  elif path.endswith(".nii"):
    suffix = ".nii"
  else:
    raise DataError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
  data = np.asarray(data)
  if data.ndim != 3:
    raise DataError(f"{path}: save_volume expects a 3D array, got shape {data.shape}")
  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4):
    raise DataError(f"{path}: affine must be 4x4, got shape {affine.shape}")
  img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
  img.set_data_dtype(np.dtype(dtype))
  # 'aligned' (2): coordinates in the space of the input the model was trained on.
  img.set_qform(affine, code="aligned")
  img.set_sform(affine, code="aligned")
  img.header.set_zooms(tuple(float(z) for z in voxel_sizes(affine)))
  img.header.set_xyzt_units("mm")
  # The temporary name keeps the extension, so nibabel picks gzip or not from it.
  with fileio.atomic_path(path, suffix=suffix) as tmp:
    nib.save(img, tmp)


# ---------------------------------------------------------------------------------------------
# Folders of volumes (another model's samples, real volumes to score against).


def list_nifti(folder: str, what: str) -> list[str]:
  """Sorted .nii / .nii.gz files in `folder`; DataError naming it if missing or empty."""
  if not os.path.isdir(folder):
    raise DataError(f"{folder}: {what} folder does not exist")
  paths = sorted(p for suffix in NIFTI_SUFFIXES
                 for p in glob.glob(os.path.join(folder, "*" + suffix)))
  if not paths:
    raise DataError(f"{folder}: no {what} (.nii / .nii.gz files) in this folder")
  return paths


def load_set(paths: list[str], what: str) -> np.ndarray:
  """Loads volumes [n, X, Y, Z] in [0, 1]; every file on the grid of the first."""
  vols, rescaled = [], 0
  for p in paths:
    v, _ = load_volume(p)
    if vols and v.shape != vols[0].shape:
      raise DataError(f"{p}: shape {v.shape} differs from {paths[0]}: {vols[0].shape}; all "
                      f"{what} must share one grid")
    v, changed = intensity.to_unit_range(v, p)
    rescaled += changed
    vols.append(v.astype(np.float32))
  if rescaled:
    logging.warning("%d of %d %s were outside [0, 1] and were rescaled by their min/max "
                    "(see data.intensity.to_unit_range)", rescaled, len(paths), what)
  return np.stack(vols)


def load_label_set(paths: list[str], shape: tuple[int, ...]) -> np.ndarray:
  """Loads label maps [n, X, Y, Z], each on the grid `shape` of its volume."""
  out = []
  for p in paths:
    lab, _ = load_labels(p)
    if lab.shape != shape:
      raise DataError(f"{p}: label map shape {lab.shape} differs from its volume's {shape}")
    out.append(lab)
  return np.stack(out)
