"""Segmenter Fréchet distance: volumes -> RAS U-Net bottleneck features -> Fréchet distance.

Sits at the end of the data flow, beside MMD, MS-SSIM and RAS (DESIGN §4). A 3D stand-in for
FID that needs no download: the features come from our own RAS segmenter (models/unet.py),
trained on real slices of the same data set, not from an ImageNet Inception network. Values
are therefore only comparable between evaluations that use the same trained segmenter, grid
and numbers of volumes; they are not FIDs and must not be set beside published FIDs.

Features of one volume [X, Y, Z]: every slice along the segmenter's slice axis goes through
the U-Net encoder to the bottleneck [S, h, w, C] (C = widths[-1], 128 by default), which is
averaged over h and w (global average pooling per slice) and then over the slices of each of
`slabs` equal, consecutive slabs along the slice axis, concatenated: [slabs · C].
With slabs = 1 (the default) a volume is one C-vector. We pool per *volume*, not per slice:
the metric compares distributions of volumes, and one sample per volume keeps the samples
independent (slices of one volume are strongly correlated, which would make a per-slice
covariance look far better determined than it is). slabs > 1 keeps coarse position along
the slice axis at the price of a larger dimension.

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

import jax
import jax.numpy as jnp
import numpy as np

from slicevae_jax.errors import DataError


def _features_fn(model: Any, slabs: int):
  @jax.jit
  def run(variables, stacks):  # [k, S, H, W] -> [k, slabs * C]
    def one(stack):
      h = model.apply(variables, stack[..., None], train=False, features=True)  # [S, h, w, C]
      per_slice = jnp.mean(h, axis=(1, 2))                                      # [S, C]
      parts = jnp.array_split(per_slice, slabs, axis=0)
      return jnp.concatenate([jnp.mean(p, axis=0) for p in parts])
    return jax.vmap(one)(stacks)
  return run


def segmenter_features(model: Any, variables: Any, volumes: Any, slice_axis: int, *,
                       slabs: int = 1, batch: int = 4, mesh: Any = None) -> np.ndarray:
  """Per-volume U-Net bottleneck features: volumes [N, X, Y, Z] -> float64 [N, slabs · C].

  Args:
    model: the RAS `UNet`; variables: its {'params', 'batch_stats'}.
    volumes: [N, X, Y, Z] in [0, 1], on the segmenter's grid.
    slice_axis: the volume axis the segmenter was trained to slice along.
    slabs: slabs along the slice axis whose pooled features are concatenated (module
      docstring); must not exceed the number of slices.
    batch: volumes per jitted call, sharded over the mesh's devices.
  """
  from slicevae_jax import inference, parallel  # pylint: disable=import-outside-toplevel
  volumes = np.asarray(volumes, np.float32)
  if volumes.ndim != 4:
    raise DataError(f"segmenter_features expects volumes [N, X, Y, Z], got {volumes.shape}")
  if not 1 <= slabs <= volumes.shape[1 + slice_axis]:
    raise ValueError(f"slabs must be in [1, {volumes.shape[1 + slice_axis]}], got {slabs}")
  mesh = mesh or parallel.make_mesh()
  stacks = np.moveaxis(volumes, slice_axis + 1, 1)                      # [N, S, H, W]
  fn = _features_fn(model, int(slabs))
  out = inference.map_volumes(lambda x: fn(variables, x), stacks, batch, mesh)
  return np.asarray(out, np.float64)


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


def segmenter_frechet_distance(model: Any, variables: Any, volumes_a: Any, volumes_b: Any,
                               slice_axis: int, *, slabs: int = 1, batch: int = 4,
                               mesh: Any = None) -> dict[str, Any]:
  """Segmenter FD between two volume sets [N_a, X, Y, Z], [N_b, X, Y, Z] (N ≥ 2 each).

  Returns dict(fd, dim, n_a, n_b, features_a [N_a, D], features_b [N_b, D]).
  """
  fa = segmenter_features(model, variables, volumes_a, slice_axis, slabs=slabs, batch=batch,
                          mesh=mesh)
  fb = segmenter_features(model, variables, volumes_b, slice_axis, slabs=slabs, batch=batch,
                          mesh=mesh)
  return dict(fd=frechet_distance(fa, fb), dim=int(fa.shape[1]), n_a=len(fa), n_b=len(fb),
              features_a=fa, features_b=fb)
