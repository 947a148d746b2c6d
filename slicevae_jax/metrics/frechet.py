"""Segmenter Fréchet distance: per-volume feature vectors [N, D] of two sets -> one distance.

Sits at the end of the data flow, beside MMD, MS-SSIM and RAS (paper §4 reports those three;
this one is ours). A 3D stand-in for FID that needs no download: the features are the RAS
segmenter's bottleneck, pooled per volume (`eval.segmenter.segmenter_features`), not an
ImageNet Inception network's. Values are therefore only comparable between evaluations that
use the same trained segmenter, grid and numbers of volumes; they are not FIDs and must not
be set beside published FIDs.

Fréchet distance between Gaussians fitted to two feature sets (Dowson & Landau 1982):

  FD = ‖μ_a − μ_b‖² + tr(Σ_a) + tr(Σ_b) − 2 tr((Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})

The last trace is computed from the eigenvalues of the symmetric PSD matrix
Σ_a^{1/2} Σ_b Σ_a^{1/2} in float64 (equal to tr((Σ_a Σ_b)^{1/2}) as FID writes it, but stable
for the singular covariances one gets with fewer volumes than feature dimensions). Like FID
it is biased upwards for finite sets: two samples of one distribution give FD > 0, the more
so the fewer volumes, so compare models only at equal set sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slicevae_jax.errors import DataError


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (ddof=1) of features [N, D], float64; N ≥ 2."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise DataError(f"need features [N >= 2, D] to fit a Gaussian, got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix; rounding negatives clipped to 0."""
  w, v = np.linalg.eigh((a + a.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray,
                                cov_b: np.ndarray) -> float:
  """‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2 tr (Σ_a^½ Σ_b Σ_a^½)^½ in float64 (module docstring)."""
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
    raise DataError(f"feature dimensions differ: {mu_a.shape} vs {mu_b.shape}")
  s = _psd_sqrt(cov_a)
  eig = np.linalg.eigvalsh(s @ cov_b @ s)
  cross = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  diff = mu_a - mu_b
  fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
  # Exact arithmetic gives FD >= 0; rounding can leave -1e-12 for identical sets.
  return max(fd, 0.0)


def frechet_distance(features_a: Any, features_b: Any) -> float:
  """Fréchet distance of Gaussians fitted to features [N_a, D] and [N_b, D]; N ≥ 2 each."""
  fa, fb = np.asarray(features_a), np.asarray(features_b)
  if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
    raise DataError(f"features must be [N, D] with one D, got {fa.shape} and {fb.shape}")
  return frechet_distance_from_stats(*gaussian_stats(fa), *gaussian_stats(fb))
