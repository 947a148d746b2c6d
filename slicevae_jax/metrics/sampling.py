"""Affine resampling for the RAS registration: voxel indices, trilinear gathers, the chain rule.

Used by `registration` only (warp, register_affine); everything here works on one volume and
is vmapped by the caller. Conventions are registration's (module docstring there): a level
grid of `level` voxels covers the field of view of the full-resolution grid `shape`, and the
parameters [vec(A - I), t] pull the moving volume back, warped(u) = moving(A u + t).

Why not `jax.scipy.ndimage.map_coordinates`: it gathers each of the eight trilinear
neighbours with its own 3-D index and bounds check, and the gradient of the registration
loss then runs back through all of them. Here

* voxel indices come from an iota (c = M j + c0, no [3, X, Y, Z] grid constant baked into
  the executable: 200 MB at 256^3);
* the moving volume is zero padded once per level and stored as rows of its 2x2x2 blocks
  (`corner_rows`, 8x the level's memory), so one row gather fetches all eight neighbours;
* the registration needs only the gradient of the loss with respect to the 12 parameters,
  and the warped volume's gradient with respect to the voxel index comes from the same eight
  values, so `param_grad` applies the chain rule by hand: dL/dc per voxel times the index map,
  summed axis by axis (the grid is separable).

Values agree with map_coordinates(order=1 or 0, mode='constant', cval=0) to float rounding:
the padding reads 0 outside the volume, points beyond the padding are masked to 0, and
nearest rounds half away from zero as map_coordinates does.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_OFFSETS = tuple((dx, dy, dz) for dx in (0, 1) for dy in (0, 1) for dz in (0, 1))


def grid_slice(stride: int) -> slice:
  """The level voxels a grid of this stride samples, per axis: stride // 2, + stride, ..."""
  return slice(stride // 2, None, stride)


def grid_shape(level: Sequence[int], stride: int = 1) -> tuple[int, ...]:
  """Shape of the level grid sampled every `stride` voxels (`grid_slice`)."""
  return tuple(len(range(stride // 2, m, stride)) for m in level)


def axis_factors(shape: Sequence[int], level: Sequence[int],
                 stride: int = 1) -> tuple[np.ndarray, ...]:
  """Per-axis constants (s, o, k, k0) [3] each, float64.

  x = s * j + o is the normalised coordinate of grid point j (level voxel stride * j +
  stride // 2); c = k * u + k0 is the continuous level voxel index of normalised coordinate u.
  """
  scale = max(shape) / 2
  n, m = np.asarray(shape, np.float64), np.asarray(level, np.float64)
  s, o = n / m / scale, (0.5 * n / m - n / 2) / scale
  return s * stride, o + s * (stride // 2), scale * m / n, m / 2 - 0.5


def axis_coords(shape: Sequence[int], level: Sequence[int]) -> list[Array]:
  """Normalised coordinates of the level grid's voxel centres, one [m] array per axis."""
  s, o, _, _ = axis_factors(shape, level)
  return [jnp.arange(m, dtype=jnp.float32) * np.float32(s[d]) + np.float32(o[d])
          for d, m in enumerate(level)]


def voxel_index(params: Array, shape: Sequence[int], level: Sequence[int],
                stride: int = 1) -> list[Array]:
  """Continuous moving-level voxel indices [*grid_shape] x 3 sampled at each point of the
  fixed level's grid (every `stride` voxels).

  c = k * (A (s * j + o) + t) + k0, written as c = M j + c0 over an iota j.
  """
  s, o, k, k0 = (np.asarray(f, np.float32) for f in axis_factors(shape, level, stride))
  a = jnp.eye(3, dtype=jnp.float32) + params[:9].reshape(3, 3)
  mat = (k[:, None] * s[None, :]) * a
  off = k * (a @ o + params[9:]) + k0
  grid = grid_shape(level, stride)
  j = [jax.lax.broadcasted_iota(jnp.float32, grid, d) for d in range(3)]
  return [mat[d, 0] * j[0] + mat[d, 1] * j[1] + mat[d, 2] * j[2] + off[d] for d in range(3)]


def corner_rows(volume: Array) -> Array:
  """[m0, m1, m2] -> [(m0 + 2) (m1 + 2) (m2 + 2), 8]: the zero-padded volume's 2x2x2 blocks.

  Row r holds the block whose low corner is padded voxel r (row-major), so one row gather
  at `locate`'s index fetches all eight trilinear neighbours.
  """
  m = volume.shape
  p = jnp.pad(volume, [(1, 2)] * 3)
  blocks = [p[dx:dx + m[0] + 2, dy:dy + m[1] + 2, dz:dz + m[2] + 2] for dx, dy, dz in _OFFSETS]
  return jnp.stack(blocks, axis=-1).reshape(-1, 8)


def _gather_corners(volume: Array, flat: Array) -> Array:
  """Eight scalar gathers from the padded volume (no 8x copy): [*out, 8], as corner_rows."""
  m = volume.shape
  p = jnp.pad(volume, 1).reshape(-1)
  s1, s0 = m[2] + 2, (m[1] + 2) * (m[2] + 2)
  return jnp.stack([p[flat + (dx * s0 + dy * s1 + dz)] for dx, dy, dz in _OFFSETS], axis=-1)


def locate(c: Sequence[Array], level: Sequence[int]) -> tuple[Array, list[Array], Array]:
  """Continuous indices (3 arrays) -> (padded row-major index of the low corner [int32],
  fractions [3 arrays], inside: whether the point reads anything but padding)."""
  inside = ((c[0] > -1) & (c[0] < level[0]) & (c[1] > -1) & (c[1] < level[1])
            & (c[2] > -1) & (c[2] < level[2]))
  low = [jnp.clip(jnp.floor(x), -1, n - 1) for x, n in zip(c, level)]
  frac = [x - lo for x, lo in zip(c, low)]
  li = [lo.astype(jnp.int32) + 1 for lo in low]
  flat = (li[0] * (level[1] + 2) + li[1]) * (level[2] + 2) + li[2]
  return flat, frac, inside


def trilinear(corners: Array, frac: Sequence[Array], inside: Array,
              with_grad: bool = False) -> Array | tuple[Array, list[Array]]:
  """Trilinear value (and its gradient with respect to the 3 voxel indices) from [..., 8]
  corners in `corner_rows` order; 0 where not `inside`."""
  v = [corners[..., i] for i in range(8)]
  fx, fy, fz = frac
  d00, d01, d10, d11 = v[1] - v[0], v[3] - v[2], v[5] - v[4], v[7] - v[6]   # along z
  c00, c01, c10, c11 = v[0] + fz * d00, v[2] + fz * d01, v[4] + fz * d10, v[6] + fz * d11
  e0, e1 = c01 - c00, c11 - c10                                             # along y
  c0, c1 = c00 + fy * e0, c10 + fy * e1
  zero = jnp.zeros_like(c0)
  value = jnp.where(inside, c0 + fx * (c1 - c0), zero)
  if not with_grad:
    return value
  gz0, gz1 = d00 + fy * (d01 - d00), d10 + fy * (d11 - d10)
  grads = (c1 - c0, e0 + fx * (e1 - e0), gz0 + fx * (gz1 - gz0))
  return value, [jnp.where(inside, g, zero) for g in grads]


def sample(volume: Array, params: Array, shape: Sequence[int], order: int) -> Array:
  """volume [*level] (covering the field of `shape`) sampled at A u + t on its own grid.

  order 1: trilinear; order 0: nearest (half away from zero); outside reads 0.
  """
  level = volume.shape
  c = voxel_index(params, shape, level)
  if order == 1:
    flat, frac, inside = locate(c, level)
    return trilinear(_gather_corners(volume, flat), frac, inside)
  idx = [jax.lax.round(x, jax.lax.RoundingMethod.AWAY_FROM_ZERO) for x in c]
  inside = ((idx[0] >= 0) & (idx[0] < level[0]) & (idx[1] >= 0) & (idx[1] < level[1])
            & (idx[2] >= 0) & (idx[2] < level[2]))
  ii = [jnp.clip(x, 0, n - 1).astype(jnp.int32) for x, n in zip(idx, level)]
  out = volume.reshape(-1)[(ii[0] * level[1] + ii[1]) * level[2] + ii[2]]
  return jnp.where(inside, out, jnp.zeros_like(out))


def sample_with_grad(rows: Array, params: Array, shape: Sequence[int], level: Sequence[int],
                     stride: int = 1) -> tuple[Array, list[Array]]:
  """Trilinear warp of the level volume stored as `corner_rows`, on the grid of `stride` ->
  (value [*grid_shape], d value / d voxel index [*grid_shape] x 3)."""
  flat, frac, inside = locate(voxel_index(params, shape, level, stride), level)
  return trilinear(rows[flat], frac, inside, with_grad=True)


def param_grad(dloss: Array, grads: Sequence[Array], shape: Sequence[int],
               level: Sequence[int] | None = None, stride: int = 1) -> Array:
  """Chain rule: dL/d(warped) [*grid] and d(warped)/dc (3 arrays) -> dL/dparams [12].

  level: the moving level's shape (default: the grid's, stride 1).

  With h_d = dL/dc_d per voxel and c_d = k_d (sum_e A_de x_e + t_d) + k0_d, x_e = s_e j_e + o_e:
  dL/dA_de = k_d (s_e sum h_d j_e + o_e sum h_d) and dL/dt_d = k_d sum h_d. The sums over
  the grid weighted by j_e reduce the other two axes first.
  """
  grid = dloss.shape
  s, o, k, _ = (np.asarray(f, np.float32) for f in axis_factors(shape, level or grid, stride))
  h = jnp.stack([dloss * g for g in grads])                       # [3, *level]
  per_axis = [jnp.sum(h, axis=tuple(1 + a for a in range(3) if a != e)) for e in range(3)]
  total = jnp.sum(per_axis[0], axis=1)                            # [3]
  moments = jnp.stack([p @ jnp.arange(n, dtype=jnp.float32)
                       for p, n in zip(per_axis, grid)], axis=1)   # [3 (d), 3 (e)]
  grad_a = k[:, None] * (s[None, :] * moments + o[None, :] * total[:, None])
  return jnp.concatenate([grad_a.reshape(9), k * total])
