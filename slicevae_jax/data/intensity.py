"""Intensity normalisation shared by real preprocessing and the embedded default."""

import numpy as np


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
