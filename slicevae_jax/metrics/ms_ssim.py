"""3D (MS-)SSIM: generated or real volumes [N, X, Y, Z] -> similarity per pair -> diversity score.

Sits at the end of the data flow (sampled volumes -> metrics, paper §4.2). The
diversity protocol `pairwise_ms_ssim` averages MS-SSIM over random distinct pairs drawn from
one set of volumes: lower means more diverse samples. The paper follows Kwon et al. (2019),
whose reference code has quirks; `kwon=True` reproduces them, the default is the textbook form.

Formulas (Wang, Simoncelli & Bovik 2003), per scale j, with Gaussian-weighted local statistics
μ_x = G*x, σ_x² = G*x² − μ_x², σ_xy = G*(xy) − μ_x μ_y (G: separable 3D Gaussian, σ = 1.5,
valid correlation, no padding), C1 = (0.01·L)², C2 = (0.03·L)², L = `data_range`:

  l(v)  = (2 μ_x μ_y + C1) / (μ_x² + μ_y² + C1)              luminance map
  cs(v) = (2 σ_xy + C2) / (σ_x² + σ_y² + C2)                 contrast-structure map
  cs_j  = mean_v cs(v),   ssim_j = mean_v l(v)·cs(v)          means over the valid voxels

Five scales, weights w = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2× average pooling
(stride 2, odd sizes floored) between scales.

* Default (correct, Wang et al.): contrast-structure at every scale, luminance only at the
  coarsest, negative terms clamped to 0 (as `tf.image.ssim_multiscale` does):

    MS-SSIM = Π_{j=1..4} relu(cs_j)^{w_j} · relu(ssim_5)^{w_5}        ∈ [0, 1]

  Window: 11 taps centred at (n−1)/2 (Wang et al.'s 11×11 window, σ = 1.5).
* `kwon=True` (Kwon et al.'s reference): the product of the per-scale terms was broadcast so
  that the last-scale SSIM multiplies each of the four other factors before the product:

    MS-SSIM_kwon = Π_{j=1..4} cs_j^{w_j} · ssim_5^{4·w_5}

  i.e. the coarsest scale is weighted 4·w_5 = 0.5332 instead of 0.1333 (a bug, kept for
  comparability with Table 1). No clamp: a negative cs_j or ssim_5 raised to a fractional
  power gives NaN, exactly as `torch.pow` did in the reference. That only happens when a
  pair's fine structure is anti-correlated (e.g. x against 1 − x, or independent noise); brain
  volumes on a shared grid stay positive. Window: 13 taps, centred at n//2 (the reference's
  `x − n//2`; the same as (n−1)/2 for odd n, half a voxel off-centre for even n).

Coarse scales smaller than the window: at every scale and on every axis the window shrinks to
min(taps, size) taps and the Gaussian (σ = 1.5) is recomputed and renormalised for that length,
as the reference does (`real_size = min(window_size, size)`). So at 64³ the five scales are
64, 32, 16, 8, 4 voxels a side and the windows 13, 13, 13, 8, 4 taps (Kwon) or 11, 11, 11,
8, 4 (default); at the coarsest scale SSIM is computed from one window covering the whole 4³
volume. Every scale must keep at least 2 voxels a side, so volumes need ≥ 2^5 = 32 voxels on
every axis.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slicevae_jax.errors import DataError

Array = jax.Array

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SIGMA = 1.5
DEFAULT_TAPS = 11   # Wang et al. 2003
KWON_TAPS = 13      # Kwon et al.'s reference code
K1, K2 = 0.01, 0.03


# ---------------------------------------------------------------------------------------------
# Windows, filtering, pooling.


def gaussian_window(taps: int, sigma: float = SIGMA, *, kwon: bool = False) -> np.ndarray:
  """1D Gaussian window [taps] (float64), normalised to sum 1.

  g_k ∝ exp(−(k − c)² / (2σ²)), k = 0..taps−1, with centre c = (taps − 1)/2 (symmetric), or
  c = taps // 2 when `kwon` (the reference's centring; differs only for even `taps`).
  """
  if taps < 1:
    raise ValueError(f"a window needs at least one tap, got {taps}")
  centre = taps // 2 if kwon else (taps - 1) / 2
  k = np.arange(taps, dtype=np.float64)
  g = np.exp(-((k - centre) ** 2) / (2.0 * sigma**2))
  return g / g.sum()


def _correlate_valid(v: Array, window: np.ndarray, axis: int) -> Array:
  """Valid 1D correlation along `axis`: out[i] = Σ_k w_k v[i + k]; length L − taps + 1.

  A sum of shifted slices rather than a convolution op: with ≤ 13 taps XLA fuses it into one
  loop per axis, and it needs no channel/layout bookkeeping.
  """
  n = v.shape[axis]
  out_len = n - len(window) + 1
  out = None
  for k, w in enumerate(window):
    term = float(w) * jax.lax.slice_in_dim(v, k, k + out_len, axis=axis)
    out = term if out is None else out + term
  return out


def _gaussian_filter_valid(v: Array, taps: int, sigma: float, kwon: bool) -> Array:
  """Separable 3D Gaussian, valid mode, on the last three axes of v [..., X, Y, Z].

  Per axis the window has min(taps, size) taps (see module docstring).
  """
  for axis in (-3, -2, -1):
    size = v.shape[axis]
    v = _correlate_valid(v, gaussian_window(min(taps, size), sigma, kwon=kwon), axis)
  return v


def _avg_pool2(v: Array) -> Array:
  """2× average pooling, stride 2, on the last three axes; odd sizes drop the last voxel.

  The mean of the 8 strided sub-grids: on XLA:CPU this fuses into one loop and runs ~7×
  faster than a reshape to [..., X/2, 2, Y/2, 2, Z/2, 2] and a reduction.
  """
  x, y, z = v.shape[-3:]
  v = v[..., : x // 2 * 2, : y // 2 * 2, : z // 2 * 2]
  corners = [v[..., i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
  return sum(corners[1:], corners[0]) / 8.0


def scale_sizes(shape: Sequence[int],
                num_scales: int = len(MS_SSIM_WEIGHTS)) -> list[tuple[int, ...]]:
  """Spatial shapes at each scale: [(X, Y, Z), (X//2, Y//2, Z//2), ...]."""
  sizes = [tuple(int(s) for s in shape)]
  for _ in range(num_scales - 1):
    sizes.append(tuple(s // 2 for s in sizes[-1]))
  return sizes


# ---------------------------------------------------------------------------------------------
# SSIM statistics.


def _ssim_terms(x: Array, y: Array, *, taps: int, sigma: float, kwon: bool,
                data_range: Array | float) -> tuple[Array, Array]:
  """Mean SSIM and mean contrast-structure for x, y [N, X, Y, Z] -> ([N], [N])."""
  c1 = (K1 * data_range) ** 2
  c2 = (K2 * data_range) ** 2
  # One filter pass over the five moment maps stacked on a leading axis.
  moments = jnp.stack([x, y, x * x, y * y, x * y])                   # [5, N, X, Y, Z]
  mu_x, mu_y, e_xx, e_yy, e_xy = _gaussian_filter_valid(moments, taps, sigma, kwon)
  var_x = e_xx - mu_x * mu_x
  var_y = e_yy - mu_y * mu_y
  cov_xy = e_xy - mu_x * mu_y
  lum = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
  cs = (2.0 * cov_xy + c2) / (var_x + var_y + c2)
  axes = (-3, -2, -1)
  return jnp.mean(lum * cs, axis=axes), jnp.mean(cs, axis=axes)


@functools.partial(jax.jit, static_argnames=("taps", "sigma"))
def _ssim3d_jit(x: Array, y: Array, data_range: Array, taps: int, sigma: float) -> Array:
  return _ssim_terms(x, y, taps=taps, sigma=sigma, kwon=False, data_range=data_range)[0]


@functools.partial(jax.jit, static_argnames=("kwon", "taps", "sigma"))
def _ms_ssim_jit(x: Array, y: Array, data_range: Array, kwon: bool, taps: int,
                 sigma: float) -> Array:
  weights = jnp.asarray(MS_SSIM_WEIGHTS, jnp.float32)
  num_scales = len(MS_SSIM_WEIGHTS)
  cs_list = []
  ssim_last = None
  for j in range(num_scales):
    ssim_j, cs_j = _ssim_terms(x, y, taps=taps, sigma=sigma, kwon=kwon, data_range=data_range)
    cs_list.append(cs_j)
    ssim_last = ssim_j
    if j < num_scales - 1:
      x, y = _avg_pool2(x), _avg_pool2(y)
  cs = jnp.stack(cs_list[:-1], axis=-1)                               # [N, 4]
  if kwon:
    # The reference's broadcast bug: ssim_5^{w5} multiplied into each of the 4 cs factors.
    # No clamp, so negative bases give NaN as torch.pow did.
    return jnp.prod(cs ** weights[:-1], axis=-1) * ssim_last ** (4.0 * weights[-1])
  return (jnp.prod(jax.nn.relu(cs) ** weights[:-1], axis=-1)
          * jax.nn.relu(ssim_last) ** weights[-1])


# ---------------------------------------------------------------------------------------------
# Public API.


def _prepare(x: Any, y: Any, min_size: int) -> tuple[Array, Array, bool]:
  """Checks shapes, casts to float32, adds the batch axis if missing."""
  xs, ys = np.shape(x), np.shape(y)
  if xs != ys:
    raise DataError(f"x and y must have the same shape, got x {xs} and y {ys}")
  if len(xs) not in (3, 4):
    raise DataError(f"expected volumes [X, Y, Z] or [N, X, Y, Z], got shape {xs}")
  if min(xs[-3:]) < min_size:
    raise DataError(f"volumes of shape {xs} are too small: every spatial axis needs at least "
                    f"{min_size} voxels")
  single = len(xs) == 3
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  if single:
    x, y = x[None], y[None]
  return x, y, single


def ssim3d(x: Any, y: Any, *, data_range: float = 1.0, taps: int = DEFAULT_TAPS,
           sigma: float = SIGMA) -> Array:
  """Single-scale 3D SSIM: x, y [N, X, Y, Z] (or [X, Y, Z]) -> [N] (or scalar).

  ssim = mean_v l(v)·cs(v) over the valid voxels (module docstring), Gaussian window of
  min(taps, size) symmetric taps per axis, C1 = (0.01·L)², C2 = (0.03·L)², L = data_range.
  """
  x, y, single = _prepare(x, y, min_size=2)
  out = _ssim3d_jit(x, y, jnp.float32(data_range), taps=int(taps), sigma=float(sigma))
  return out[0] if single else out


def ms_ssim(x: Any, y: Any, *, kwon: bool = False, data_range: float = 1.0,
            taps: int | None = None, sigma: float = SIGMA) -> Array:
  """3D MS-SSIM, 5 scales: x, y [N, X, Y, Z] (or [X, Y, Z]) -> [N] (or scalar), float32.

  Default: Π_{j=1..4} relu(cs_j)^{w_j} · relu(ssim_5)^{w_5}, 11-tap symmetric window.
  kwon=True: Π_{j=1..4} cs_j^{w_j} · ssim_5^{4·w_5}, 13-tap reference-centred window, no clamp
  (NaN where a base is negative). `taps` overrides the window length of either mode. Volumes
  need ≥ 32 voxels on every axis; see the module docstring for how coarse scales shrink the
  window. Jitted; one compile per input shape and mode.
  """
  if taps is None:
    taps = KWON_TAPS if kwon else DEFAULT_TAPS
  min_size = 2 ** len(MS_SSIM_WEIGHTS)
  x, y, single = _prepare(x, y, min_size=min_size)
  out = _ms_ssim_jit(x, y, jnp.float32(data_range), kwon=bool(kwon), taps=int(taps),
                     sigma=float(sigma))
  return out[0] if single else out


def random_distinct_pairs(num_volumes: int, num_pairs: int, key: Array) -> np.ndarray:
  """num_pairs index pairs (i, j), i ≠ j, uniform over ordered distinct pairs -> [P, 2] int.

  Pairs are drawn independently (a pair may repeat); j = (i + u) mod N with u uniform on
  1..N−1 makes i ≠ j without rejection.
  """
  if num_volumes < 2:
    raise DataError(f"need at least 2 volumes to form a pair, got {num_volumes}")
  key_i, key_u = jax.random.split(key)
  i = jax.random.randint(key_i, (num_pairs,), 0, num_volumes)
  u = jax.random.randint(key_u, (num_pairs,), 1, num_volumes)
  return np.stack([np.asarray(i), np.asarray((i + u) % num_volumes)], axis=1)


def pairwise_ms_ssim(volumes: Any, num_pairs: int, key: Array, *, batch: int = 8,
                     **kw: Any) -> dict[str, Any]:
  """Diversity protocol: mean MS-SSIM over random distinct pairs of one set of volumes.

  Args:
    volumes: [N, X, Y, Z] in [0, data_range] (numpy or JAX), generated samples or, for the
      real-data row of Table 1, real volumes. Stays where it is; only `batch` pairs at a time
      are gathered and sent to the device.
    num_pairs: number of pairs P.
    key: PRNG key that chooses the pairs.
    batch: pairs per jitted call (the last call is padded, so there is one compile).
    **kw: passed to `ms_ssim` (kwon, data_range, taps, sigma).

  Returns:
    dict(mean, std, values [P], pairs [P, 2]); mean and std (ddof=0) are plain float means,
    so in Kwon mode a NaN pair (negative base, see module docstring) makes them NaN.
  """
  shape = np.shape(volumes)
  if len(shape) != 4:
    raise DataError(f"volumes must be [N, X, Y, Z], got shape {shape}")
  if num_pairs < 1 or batch < 1:
    raise ValueError(f"num_pairs and batch must be positive, got {num_pairs} and {batch}")
  pairs = random_distinct_pairs(shape[0], num_pairs, key)
  # Gathering `batch` pairs at a time from a numpy set keeps a large set off the device.
  values = []
  for start in range(0, num_pairs, batch):
    chunk = pairs[start:start + batch]
    pad = batch - len(chunk)
    idx = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
    vals = ms_ssim(volumes[idx[:, 0]], volumes[idx[:, 1]], **kw)
    values.append(np.asarray(vals)[: len(chunk)])
  values = np.concatenate(values).astype(np.float64)
  return dict(mean=float(np.mean(values)), std=float(np.std(values)), values=values,
              pairs=pairs)
