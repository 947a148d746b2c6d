"""Realistic Atlas Score: volumes used as atlases for real ones -> Dice per label (paper §2.2).

Sits at the end of the data flow, after sampling (paper §4.3). For every (moving, fixed) pair
of a set of moving volumes [n, X, Y, Z] (generated samples, with labels predicted by the RAS
U-Net) and a set of real volumes [M, X, Y, Z] with their own label maps:

  1. register the moving volume affinely to the fixed one (`registration.register_affine`,
     `pair_batch` pairs a call: vmapped on an accelerator, one at a time on CPU);
  2. warp the moving volume's predicted labels with the same transform (nearest neighbour);
  3. Dice per label against the fixed volume's labels.

Returns the per-pair per-label Dice [n, M, K]; per label, the mean over pairs (NaN pairs —
a label absent from both maps — are skipped); and RAS = the mean of the per-label means over
the labels other than background 0. Higher is more realistic; the paper reports it per label
(Fig. 4) and as this mean.

`ras_real_vs_real` runs the same procedure from one set of real volumes (moving) to a disjoint
one (fixed). The moving real volumes are segmented by the same U-Net rather than given their
own ground-truth labels, exactly like generated volumes: the score is then the ceiling of the
*protocol* (segmenter errors + affine registration + anatomical variability between
subjects), the paper's upper bound, not a measure of how good the real labels are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import logging

from slicevae_jax.errors import DataError
from slicevae_jax.metrics import registration

SegmentFn = Callable[[np.ndarray], np.ndarray]


def _check_sets(moving: np.ndarray, moving_labels: np.ndarray, fixed: np.ndarray,
                fixed_labels: np.ndarray) -> None:
  if moving.ndim != 4 or fixed.ndim != 4:
    raise DataError(f"RAS expects volume sets [n, X, Y, Z]; got moving {moving.shape} and "
                    f"fixed {fixed.shape}")
  if moving.shape[1:] != fixed.shape[1:]:
    raise DataError(f"RAS needs one grid: moving volumes are {moving.shape[1:]}, fixed "
                    f"volumes {fixed.shape[1:]}")
  if moving_labels.shape != moving.shape or fixed_labels.shape != fixed.shape:
    raise DataError(f"label maps must match their volumes: moving {moving_labels.shape} vs "
                    f"{moving.shape}, fixed {fixed_labels.shape} vs {fixed.shape}")
  if len(moving) < 1 or len(fixed) < 1:
    raise DataError(f"RAS needs at least one volume per set, got {len(moving)} moving and "
                    f"{len(fixed)} fixed")


def ras_from_labels(moving: Any, moving_labels: Any, fixed: Any, fixed_labels: Any,
                    num_labels: int, *, pair_batch: int = 8,
                    **reg_kwargs: Any) -> dict[str, Any]:
  """RAS of moving volumes whose labels are already known (steps 2–3 of the procedure).

  Args:
    moving: [n, X, Y, Z] volumes in [0, 1] (generated samples, or real volumes for the upper
      bound).
    moving_labels: [n, X, Y, Z] integer labels of `moving`, as predicted by the segmenter.
    fixed: [M, X, Y, Z] real volumes in [0, 1].
    fixed_labels: [M, X, Y, Z] integer labels of `fixed`, in [0, num_labels).
    num_labels: K, background 0 included.
    pair_batch: pairs registered per jitted call; the last chunk is padded by repeating a
      pair, so every call has one shape and compiles once.
    **reg_kwargs: passed to `registration.register_affine` (levels, iters, lr, similarity,
      ...; the eval stage takes them from config.eval).

  Returns:
    dict with
      dice [n, M, K] float64 (NaN: background, and labels absent from both maps of a pair),
      per_label [K] (mean over pairs, NaN for background),
      per_volume [n] (mean over labels ≠ 0 and over the M fixed volumes, per moving volume),
      ras (float: mean of per_label over labels ≠ 0 that occur),
      num_pairs (n·M).
  """
  moving = np.asarray(moving, np.float32)
  fixed = np.asarray(fixed, np.float32)
  moving_labels = np.asarray(moving_labels)
  fixed_labels = np.asarray(fixed_labels)
  _check_sets(moving, moving_labels, fixed, fixed_labels)
  if pair_batch < 1:
    raise ValueError(f"pair_batch must be >= 1, got {pair_batch}")
  n, m = len(moving), len(fixed)
  # All n·M pairs, moving-major: pair p = (p // M, p % M).
  pairs = np.stack(np.meshgrid(np.arange(n), np.arange(m), indexing="ij"), -1).reshape(-1, 2)
  batch = min(pair_batch, len(pairs))
  dice = np.empty((len(pairs), num_labels), np.float64)
  for start in range(0, len(pairs), batch):
    chunk = pairs[start:start + batch]
    idx = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
    mov, fix = jnp.asarray(moving[idx[:, 0]]), jnp.asarray(fixed[idx[:, 1]])
    params = registration.register_affine(mov, fix, **reg_kwargs)
    warped = registration.warp_labels(jnp.asarray(moving_labels[idx[:, 0]], jnp.int32), params)
    d = registration.dice(warped, jnp.asarray(fixed_labels[idx[:, 1]], jnp.int32), num_labels,
                          ignore_background=True)
    dice[start:start + len(chunk)] = np.asarray(d, np.float64)[:len(chunk)]
    logging.log_every_n_seconds(logging.INFO, "RAS: %d / %d pairs registered", 30,
                                start + len(chunk), len(pairs))
  dice = dice.reshape(n, m, num_labels)
  # nanmean over an all-NaN slice warns and gives NaN, which is the right answer here.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", category=RuntimeWarning)
    per_label = np.nanmean(dice, axis=(0, 1))
    per_volume = np.nanmean(dice[..., 1:], axis=(1, 2))
    score = float(np.nanmean(per_label[1:]))
  return dict(dice=dice, per_label=per_label, per_volume=per_volume, ras=score,
              num_pairs=int(n * m))


def realistic_atlas_score(moving: Any, fixed: Any, fixed_labels: Any, segment_fn: SegmentFn,
                          num_labels: int, *, moving_labels: Any = None, pair_batch: int = 8,
                          **reg_kwargs: Any) -> dict[str, Any]:
  """The full RAS (paper §2.2): segment the moving volumes, register, warp, Dice.

  Args:
    moving: [n, X, Y, Z] generated volumes in [0, 1].
    fixed: [M, X, Y, Z] real volumes in [0, 1].
    fixed_labels: [M, X, Y, Z] their label maps.
    segment_fn: volumes [k, X, Y, Z] -> integer labels [k, X, Y, Z] (the trained U-Net,
      e.g. `segmenter.segment_volumes` with its model and variables bound).
    num_labels: K.
    moving_labels: the moving volumes' predicted labels if already computed (skips
      segment_fn).
    pair_batch, **reg_kwargs: as `ras_from_labels`.
  Returns:
    `ras_from_labels`'s dict plus moving_labels [n, X, Y, Z] (the segmentations used).
  """
  moving = np.asarray(moving, np.float32)
  if moving_labels is None:
    moving_labels = np.asarray(segment_fn(moving))
  out = ras_from_labels(moving, moving_labels, fixed, fixed_labels, num_labels,
                        pair_batch=pair_batch, **reg_kwargs)
  out["moving_labels"] = moving_labels
  return out


def ras_real_vs_real(real_a: Any, real_b: Any, real_b_labels: Any, segment_fn: SegmentFn,
                     num_labels: int, *, pair_batch: int = 8,
                     **reg_kwargs: Any) -> dict[str, Any]:
  """Upper bound of the RAS: real set A used as atlases for a disjoint real set B.

  A's volumes are segmented by the U-Net (their own labels, if any, are not used), so the
  procedure is exactly the one generated volumes go through and the score measures what the
  protocol can reach (module docstring). The caller keeps A and B disjoint.

  Args:
    real_a: [n, X, Y, Z] real volumes (moving).
    real_b: [M, X, Y, Z] other real volumes (fixed).
    real_b_labels: [M, X, Y, Z] labels of real_b.
    segment_fn, num_labels, pair_batch, **reg_kwargs: as `realistic_atlas_score`.
  """
  return realistic_atlas_score(real_a, real_b, real_b_labels, segment_fn, num_labels,
                               pair_batch=pair_batch, **reg_kwargs)

