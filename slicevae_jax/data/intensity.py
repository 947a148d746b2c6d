"""Intensities -> [0, 1]: the percentile recipe at preprocessing, min/max for others' volumes.

The percentile scaling is the real data's (paper §3.2) and the embedded default's; the
min/max rescaling brings other models' volumes to [0, 1] at evaluation.
"""

import numpy as np
from absl import logging

from slicevae_jax.errors import DataError

# Values of other models' volumes this far outside [0, 1] trigger the min/max rescaling.
RANGE_TOLERANCE = 1e-3


def normalize_percentiles(volume: np.ndarray, percentiles=(1.0, 99.0),
                          foreground: bool = True) -> np.ndarray:
  """Scales so the given percentiles map to 0 and 1, clipping outside (HCP recipe).

  Args:
    volume: [X, Y, Z] intensities.
    percentiles: (low, high) in [0, 100].
    foreground: compute the percentiles over non-zero voxels only, as suits
      skull-stripped volumes whose background is exactly zero; background stays 0.
  Returns:
    float32 [X, Y, Z] in [0, 1].
  """
  v = np.asarray(volume, np.float32)
  values = v[v != 0] if foreground else v.ravel()
  if values.size == 0:
    return np.zeros_like(v)
  lo, hi = np.percentile(values, percentiles)
  if hi <= lo:
    return np.zeros_like(v)
  out = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
  if foreground:
    out[v == 0] = 0.0
  return out.astype(np.float32)


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
