"""Affine registration and Dice: moving volume -> fixed volume's grid, for the RAS (paper §2.2).

Data flow: generated volume + its predicted labels (moving) and a real volume + its labels
(fixed) -> `register_affine` -> `warp_labels` -> `dice`. Everything is batched over pairs
with `jax.vmap`, so a GPU registers many generated/real pairs at once.

Conventions
-----------
* Volumes are [X, Y, Z] (or [B, X, Y, Z]) on a shared grid: same shape, same voxel size.
* Coordinates are normalised voxel coordinates about the grid centre, one scale for all axes:
  u = (i + 0.5 - n/2) / (max(n)/2) for voxel index i on an axis with n voxels. The largest
  axis spans [-1, 1]; because the scale is shared, a rotation in u is a rotation of the
  anatomy (for isotropic voxels) even on non-cubic grids, and because voxel centres sit at
  (i + 0.5)/n of the field of view, the same parameters hold at 64^3, 128^3 and 256^3.
* Parameters are 12 numbers `[vec(A - I) (9, row major), t (3)]`. They map a point of the
  fixed grid to the point of the moving grid that is sampled there (a pull-back):
  warped(u) = moving(A u + t). Identity is all zeros, so Adam starts from a sensible scale
  for every entry: rotations of ~10 degrees and shifts of a few voxels are both ~0.1-0.2.

Cost and numerics
-----------------
Each Adam step warps the moving level volume and needs the loss gradient for 12 numbers.
`sampling` fetches the 8 trilinear neighbours with one row gather from a block copy of the
moving level built once per level, computes the voxel indices from an iota (no grid
constant), and takes dL/d(warped) by autodiff but the rest of the chain rule by hand, so
no gradient runs back through a gather. The pairs of one call run vmapped in lockstep on an
accelerator and one at a time on CPU (`default_vmap_width`). Against the former
map_coordinates version the parameters agree to float rounding (embedded brains at 64^3,
128^3 and 256^3, self and inter-subject pairs: transforms within 3e-4 voxel, Dice within
2e-5); on a 2-core CPU a pair takes 4.2-4.7x (64^3), 2.8-3.5x (128^3) and 3.3x (256^3:
105 -> 31 s) less time, and XLA counts 2.2-2.3x fewer FLOPs and bytes per pair
(bench/reg_compare.py, bench/bench_eval.py --cost).

`fine_stride` > 1 (config eval.reg_fine_stride) takes the finest level's loss on every
fine_stride-th voxel per axis only, sampling the full-resolution moving volume there. That
changes the result, within registration tolerance as measured with stride 2: at 128^3
(8 pairs) transforms stay within 0.05 voxel RMS / 0.11 max of stride 1's, whose own error
to known truth is 0.08 RMS, inter-subject Dice within 0.001 (mean unchanged), for 4x less
time; at 256^3 (2 pairs) within 0.02 / 0.04 voxel, Dice within 1e-4, 2.8x less time. At
64^3 it moves them by up to 0.09 voxel (self-pair Dice 0.971 -> 0.969) for 2.4x, so 1
stays the default.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from slicevae_jax import config_lib
from slicevae_jax.metrics import sampling

Array = jax.Array

NUM_PARAMS = 12
SIMILARITIES = config_lib.SIMILARITIES   # ('ncc', 'lncc', 'mse'): eval.similarity's choices


# ---------------------------------------------------------------------------------------------
# Parameters <-> matrices.


def identity_params(batch_shape: tuple[int, ...] = ()) -> Array:
  """All-zero parameters (the identity transform) -> [*batch_shape, 12]."""
  return jnp.zeros((*batch_shape, NUM_PARAMS), jnp.float32)


def affine_matrix(params: Array) -> Array:
  """[..., 12] parameters -> [..., 4, 4] homogeneous matrix in normalised coordinates.

  The matrix maps fixed-grid points to moving-grid points: [u_moving, 1] = M @ [u_fixed, 1].
  """
  params = jnp.asarray(params, jnp.float32)
  batch = params.shape[:-1]
  a = jnp.eye(3, dtype=jnp.float32) + params[..., :9].reshape(*batch, 3, 3)
  top = jnp.concatenate([a, params[..., 9:, None]], axis=-1)  # [..., 3, 4]
  bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], jnp.float32), (*batch, 1, 4))
  return jnp.concatenate([top, bottom], axis=-2)


def params_from_matrix(matrix: Array) -> Array:
  """[..., 4, 4] (or [..., 3, 4]) matrix in normalised coordinates -> [..., 12] parameters."""
  matrix = jnp.asarray(matrix, jnp.float32)
  batch = matrix.shape[:-2]
  delta = matrix[..., :3, :3] - jnp.eye(3, dtype=jnp.float32)
  return jnp.concatenate([delta.reshape(*batch, 9), matrix[..., :3, 3]], axis=-1)


def invert_params(params: Array) -> Array:
  """Parameters of the inverse transform: [..., 12] -> [..., 12]."""
  return params_from_matrix(jnp.linalg.inv(affine_matrix(params)))


def compose_params(outer: Array, inner: Array) -> Array:
  """Parameters of u -> outer(inner(u)): [..., 12], [..., 12] -> [..., 12]."""
  return params_from_matrix(affine_matrix(outer) @ affine_matrix(inner))


def _rotation(angles: Array) -> Array:
  """Euler angles [3] (radians, about x then y then z) -> [3, 3] rotation Rz @ Ry @ Rx."""
  cx, cy, cz = jnp.cos(angles)
  sx, sy, sz = jnp.sin(angles)
  one, zero = jnp.ones_like(cx), jnp.zeros_like(cx)
  rx = jnp.array([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
  ry = jnp.array([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
  rz = jnp.array([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
  return rz @ ry @ rx


def params_from_components(angles: Array, scales: Array, translation: Array,
                           shear: Array | None = None) -> Array:
  """Builds parameters as A = R(angles) @ Shear @ diag(scales), t = translation.

  Args:
    angles: [3] Euler angles in radians (about x, y, z).
    scales: [3] per-axis scale factors.
    translation: [3] in normalised units (1 = half the largest grid extent).
    shear: optional [3] upper-triangular shear terms (xy, xz, yz).
  Returns:
    [12] parameters.
  """
  a = _rotation(jnp.asarray(angles, jnp.float32))
  if shear is not None:
    s = jnp.asarray(shear, jnp.float32)
    a = a @ jnp.array([[1.0, s[0], s[1]], [0.0, 1.0, s[2]], [0.0, 0.0, 1.0]])
  a = a @ jnp.diag(jnp.asarray(scales, jnp.float32))
  m = jnp.concatenate([a, jnp.asarray(translation, jnp.float32)[:, None]], axis=1)
  return params_from_matrix(m)


def random_affine(key: Array, *, max_rotation_deg: float = 10.0,
                  scale_range: tuple[float, float] = (0.9, 1.1), max_shift: float = 0.1,
                  max_shear: float = 0.0) -> Array:
  """A random affine for tests and augmentation -> [12] parameters.

  Angles uniform in ±max_rotation_deg per axis, per-axis scales uniform in scale_range,
  shifts uniform in ±max_shift (normalised units: at 48^3, 0.1 is 2.4 voxels), shears
  uniform in ±max_shear.
  """
  k_rot, k_scale, k_shift, k_shear = jax.random.split(key, 4)
  angles = jnp.deg2rad(jax.random.uniform(k_rot, (3,), minval=-max_rotation_deg,
                                          maxval=max_rotation_deg))
  scales = jax.random.uniform(k_scale, (3,), minval=scale_range[0], maxval=scale_range[1])
  shift = jax.random.uniform(k_shift, (3,), minval=-max_shift, maxval=max_shift)
  shear = jax.random.uniform(k_shear, (3,), minval=-max_shear, maxval=max_shear)
  return params_from_components(angles, scales, shift, shear)


# ---------------------------------------------------------------------------------------------
# Grids and sampling.


def _downsample(volume: Array, factor: int) -> Array:
  """[X, Y, Z] -> [ceil(X/f), ...], antialiased, keeping the field of view."""
  if factor == 1:
    return volume
  shape = tuple(max(1, math.ceil(n / factor)) for n in volume.shape)
  # Linear with antialias is a triangle filter as wide as two output voxels: smoother than a
  # box average, which helps the coarse levels find the basin, and it handles any size.
  return jax.image.resize(volume, shape, method="linear", antialias=True)


def _check_shapes(name_a: str, a: Array, name_b: str, b: Array) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_a} shape {tuple(a.shape)} and {name_b} shape {tuple(b.shape)} "
                     "differ; both must be on the same grid")


@functools.partial(jax.jit, static_argnames=("order",))
def _warp_batch(volume: Array, params: Array, order: int) -> Array:
  shape = volume.shape[1:]
  return jax.vmap(lambda v, p: sampling.sample(v, p, shape, order))(volume, params)


def warp(volume: Array, params: Array, order: int = 1) -> Array:
  """Resamples the moving volume onto the fixed grid: out(u) = volume(A u + t).

  Args:
    volume: [X, Y, Z] or [B, X, Y, Z].
    params: [12] or [B, 12] (from `register_affine`).
    order: 1 trilinear (images) or 0 nearest (labels).
  Returns:
    float32 array shaped like `volume`; outside the moving field of view reads 0.
  """
  volume = jnp.asarray(volume)
  params = jnp.asarray(params, jnp.float32)
  single = volume.ndim == 3
  if volume.ndim not in (3, 4):
    raise ValueError(f"volume must be [X, Y, Z] or [B, X, Y, Z], got shape {volume.shape}")
  if params.shape != volume.shape[:-3] + (NUM_PARAMS,):
    raise ValueError(f"params shape {params.shape} does not match volume shape {volume.shape}")
  if single:
    volume, params = volume[None], params[None]
  out = _warp_batch(volume.astype(jnp.float32), params, order)
  return out[0] if single else out


def warp_labels(labels: Array, params: Array) -> Array:
  """Nearest-neighbour warp of an integer label map: [X, Y, Z] or [B, X, Y, Z], same dtype.

  Outside the moving field of view reads as label 0 (background).
  """
  labels = jnp.asarray(labels)
  # float32 holds integers exactly up to 2**24, far more labels than any atlas has.
  out = warp(labels.astype(jnp.float32), params, order=0)
  return jnp.round(out).astype(labels.dtype)


# ---------------------------------------------------------------------------------------------
# Similarity.


def _box_sum(x: Array, window: int) -> Array:
  """Sum over a window^3 box centred on each voxel (zero padded), separable via cumsum."""
  r = window // 2
  for axis in range(3):
    pad = [(0, 0)] * 3
    pad[axis] = (r + 1, r)
    c = jnp.cumsum(jnp.pad(x, pad), axis=axis)
    n = x.shape[axis]
    x = (jax.lax.slice_in_dim(c, window, window + n, axis=axis)
         - jax.lax.slice_in_dim(c, 0, n, axis=axis))
  return x


def similarity_loss(a: Array, b: Array, kind: str = "ncc", window: int = 5,
                    eps: float = 1e-5) -> Array:
  """Dissimilarity of two volumes [X, Y, Z] -> scalar; 0 for a perfect match.

  * 'ncc':  1 - global normalised cross-correlation (robust to affine intensity changes).
  * 'lncc': 1 - mean over voxels of the squared local NCC in window^3 boxes.
  * 'mse':  mean squared difference.
  """
  if kind == "ncc":
    a0, b0 = a - jnp.mean(a), b - jnp.mean(b)
    ncc = jnp.sum(a0 * b0) / jnp.sqrt(jnp.sum(a0 * a0) * jnp.sum(b0 * b0) + eps)
    return 1.0 - ncc
  if kind == "lncc":
    n = float(window ** 3)
    sa, sb = _box_sum(a, window), _box_sum(b, window)
    cross = _box_sum(a * b, window) - sa * sb / n
    va = _box_sum(a * a, window) - sa * sa / n
    vb = _box_sum(b * b, window) - sb * sb / n
    cc = cross * cross / (va * vb + eps)
    return 1.0 - jnp.mean(cc)
  if kind == "mse":
    return jnp.mean(jnp.square(a - b))
  raise ValueError(f"unknown similarity {kind!r}; expected one of {SIMILARITIES}")


# ---------------------------------------------------------------------------------------------
# Registration.


def center_of_mass(volume: Array) -> Array:
  """Intensity-weighted centre [3] of a volume [X, Y, Z], in normalised coordinates."""
  w = jnp.maximum(volume, 0.0)
  coords = sampling.axis_coords(volume.shape, volume.shape)
  # The grid is separable: weight each axis's coordinates by the sums over the other two.
  moments = [jnp.sum(w, axis=tuple(a for a in range(3) if a != e)) @ coords[e]
             for e in range(3)]
  return jnp.stack(moments) / jnp.maximum(jnp.sum(w), 1e-8)


def level_grad(params: Array, rows: Array, fixed: Array, shape: Sequence[int], similarity: str,
               window: int, stride: int = 1) -> Array:
  """Gradient [12] of the similarity loss at one level: one step's work, for one pair.

  Args:
    params: [12].
    rows: the moving level volume as `sampling.corner_rows`.
    fixed: [*level] fixed level volume.
    shape: full-resolution grid shape (the normalisation).
    similarity, window: as `similarity_loss`.
    stride: the loss is taken on every stride-th voxel of the level (`sampling.grid_slice`).
  The gradient through the warped volume is autodiff's (any similarity); from there to the 12
  parameters it is the chain rule by hand from the sampler's spatial gradient.
  """
  level = fixed.shape
  if stride > 1:
    fixed = fixed[(sampling.grid_slice(stride),) * 3]
  warped, spatial = sampling.sample_with_grad(rows, params, shape, level, stride)
  dloss = jax.grad(similarity_loss)(warped, fixed, similarity, window)
  return sampling.param_grad(dloss, spatial, shape, level, stride)


def _register_pair(moving: Array, fixed: Array, init: Array, *, levels: int,
                   iters: tuple[int, ...], lr: tuple[float, ...], similarity: str,
                   window: int, com_init: bool, fine_stride: int = 1) -> Array:
  """One pair [X, Y, Z], [X, Y, Z], init [12] -> params [12]; vmapped by the caller."""
  shape = fixed.shape
  params = init
  if com_init:
    # A = I at the start, so a pure shift puts the fixed centre of mass on the moving one.
    params = params.at[9:].add(center_of_mass(moving) - center_of_mass(fixed))
  for level in range(levels):  # coarse to fine; unrolled, each level has its own shapes
    factor = 2 ** (levels - 1 - level)
    mov, fix = _downsample(moving, factor), _downsample(fixed, factor)
    # The moving level's 2x2x2 blocks, built once per level and gathered every step.
    rows = sampling.corner_rows(mov)
    # Cosine decay to a tenth within each level: large early steps cross the basin, small
    # late ones settle to a fraction of a voxel instead of jittering at the Adam step size.
    opt = optax.adam(optax.cosine_decay_schedule(lr[level], max(iters[level], 1), alpha=0.1))

    def step(_, carry, opt=opt, rows=rows, fix=fix, level=level):
      p, state = carry
      g = level_grad(p, rows, fix, shape, similarity, window,
                     fine_stride if level == levels - 1 else 1)
      updates, state = opt.update(g, state, p)
      return optax.apply_updates(p, updates), state

    # A fresh Adam state per level: moment estimates from the coarse loss landscape would
    # mis-scale the first fine steps.
    params, _ = jax.lax.fori_loop(0, iters[level], step, (params, opt.init(params)))
  return params


@functools.partial(jax.jit, static_argnames=("levels", "iters", "lr", "similarity", "window",
                                             "com_init", "vmap_width", "fine_stride"))
def _register_batch(moving: Array, fixed: Array, init: Array, *, vmap_width: int,
                    **kw) -> Array:
  pair = functools.partial(_register_pair, **kw)
  return jax.lax.map(lambda x: pair(*x), (moving, fixed, init), batch_size=vmap_width)


def default_vmap_width(batch: int, platform: str | None = None) -> int:
  """Pairs registered in lockstep (vmapped) within one call: all of them on an accelerator,
  one at a time on CPU, where a vmapped batch's gathered blocks no longer stay in cache
  (64^3, 4 pairs: 2.5x the time per pair of one pair at a time)."""
  platform = platform or jax.default_backend()
  return 1 if platform == "cpu" else max(1, batch)


def register_affine(moving: Array, fixed: Array, *, levels: int = 3,
                    iters: Sequence[int] = (150, 100, 50), lr: float | Sequence[float] = 0.01,
                    similarity: str = "ncc", window: int = 5, com_init: bool = True,
                    init: Array | None = None, vmap_width: int | None = None,
                    fine_stride: int = 1) -> Array:
  """Affinely registers moving volumes to fixed ones, pair by pair.

  Multi-resolution: level k (0 = coarsest) works on volumes downsampled by 2**(levels-1-k),
  with iters[k] Adam steps at learning rate lr[k] on the similarity loss of the trilinearly
  warped moving volume. All levels and pairs run in one jitted function, the pairs vmapped in
  chunks of `vmap_width`.

  Args:
    moving: [X, Y, Z] or [B, X, Y, Z] float volumes in [0, 1] (e.g. generated samples).
    fixed: the same shape (e.g. real subjects).
    levels: number of resolution levels.
    iters: Adam steps per level, coarsest first (length `levels`).
    lr: Adam learning rate, one for all levels or one per level.
    similarity: 'ncc' (global, default), 'lncc' (local, window^3) or 'mse'.
    window: box size for 'lncc'.
    com_init: start from the translation aligning the centres of mass (recommended).
    init: optional starting parameters [12] or [B, 12] (default identity).
    vmap_width: pairs run in lockstep (vmapped) within the call, the chunks of that many one
      after another; None: `default_vmap_width` (all pairs on GPU/TPU, 1 on CPU). Results do
      not depend on it beyond float rounding.
    fine_stride: the finest level's loss on every fine_stride-th voxel per axis (module
      docstring: faster, and a change of the result within registration tolerance).
  Returns:
    params [12] or [B, 12] such that warp(moving, params) ~ fixed.
  """
  moving = jnp.asarray(moving, jnp.float32)
  fixed = jnp.asarray(fixed, jnp.float32)
  _check_shapes("moving", moving, "fixed", fixed)
  if moving.ndim not in (3, 4):
    raise ValueError(f"volumes must be [X, Y, Z] or [B, X, Y, Z], got shape {moving.shape}")
  if similarity not in SIMILARITIES:
    raise ValueError(f"unknown similarity {similarity!r}; expected one of {SIMILARITIES}")
  iters = tuple(int(i) for i in iters)
  lrs = tuple(float(x) for x in lr) if isinstance(lr, Sequence) else (float(lr),) * levels
  if len(iters) != levels or len(lrs) != levels:
    raise ValueError(f"iters {iters} and lr {lrs} need one entry per level ({levels})")
  if int(fine_stride) < 1 or (vmap_width is not None and int(vmap_width) < 1):
    raise ValueError(f"fine_stride ({fine_stride}) and vmap_width ({vmap_width}) must be >= 1")
  single = moving.ndim == 3
  if single:
    moving, fixed = moving[None], fixed[None]
  batch = moving.shape[0]
  init = identity_params((batch,)) if init is None else jnp.broadcast_to(
      jnp.asarray(init, jnp.float32), (batch, NUM_PARAMS))
  if vmap_width is None:
    vmap_width = default_vmap_width(batch)
  params = _register_batch(moving, fixed, init, levels=levels, iters=iters, lr=lrs,
                           similarity=similarity, window=int(window), com_init=com_init,
                           vmap_width=min(int(vmap_width), batch), fine_stride=int(fine_stride))
  return params[0] if single else params


def register_and_warp_labels(moving: Array, fixed: Array, moving_labels: Array,
                             **kwargs) -> tuple[Array, Array]:
  """Registers moving -> fixed and carries the moving labels along (the RAS steps 2-3).

  Args:
    moving, fixed: [X, Y, Z] or [B, X, Y, Z] volumes.
    moving_labels: integer labels of `moving`, same shape.
    **kwargs: passed to `register_affine`.
  Returns:
    (warped labels on the fixed grid, same shape and dtype as moving_labels; params).
  """
  _check_shapes("moving", jnp.asarray(moving), "moving_labels", jnp.asarray(moving_labels))
  params = register_affine(moving, fixed, **kwargs)
  return warp_labels(moving_labels, params), params


# ---------------------------------------------------------------------------------------------
# Dice.


@functools.partial(jax.jit, static_argnames=("num_labels", "ignore_background"))
def _dice_flat(a: Array, b: Array, num_labels: int, ignore_background: bool) -> Array:
  def one(x, y):
    # Counts per label, not one-hot masks: O(voxels) memory whatever the number of labels.
    count_a = jnp.bincount(x, length=num_labels)
    count_b = jnp.bincount(y, length=num_labels)
    both = jnp.bincount(jnp.where(x == y, x, num_labels), length=num_labels + 1)[:num_labels]
    total = (count_a + count_b).astype(jnp.float32)
    d = jnp.where(total > 0, 2.0 * both / jnp.maximum(total, 1.0), jnp.nan)
    if ignore_background:
      d = d.at[0].set(jnp.nan)
    return d
  return jax.vmap(one)(a, b)


def dice(a: Array, b: Array, num_labels: int, ignore_background: bool = True) -> Array:
  """Per-label Dice 2|A∩B| / (|A| + |B|) of two integer label maps.

  Args:
    a, b: [..., X, Y, Z] integer label maps in [0, num_labels); other values are ignored.
    num_labels: number of labels including background 0.
    ignore_background: report label 0 as NaN.
  Returns:
    float32 [..., num_labels]; NaN for labels absent from both maps (and for background when
    ignored), so `jnp.nanmean` averages over the labels that are present.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  _check_shapes("a", a, "b", b)
  if a.ndim < 3:
    raise ValueError(f"label maps must be [..., X, Y, Z], got shape {a.shape}")
  lead, voxels = a.shape[:-3], math.prod(a.shape[-3:])
  a, b = (x.reshape(-1, voxels).astype(jnp.int32) for x in (a, b))
  d = _dice_flat(a, b, int(num_labels), bool(ignore_background))
  return d.reshape(*lead, num_labels)


def mean_dice(a: Array, b: Array, num_labels: int, ignore_background: bool = True) -> Array:
  """Mean over present labels of `dice` -> [...] (NaN if no label is present)."""
  return jnp.nanmean(dice(a, b, num_labels, ignore_background), axis=-1)
