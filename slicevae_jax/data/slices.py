"""Training batches: cache -> shuffled (volume, slice) pairs or whole volumes -> host arrays.

The batch of step k is a pure function of (seed, k): items are drawn from a
stream made of one seeded permutation per epoch, so a resumed run sees exactly
the batches an uninterrupted one would, with no loader state to checkpoint.
Slices feed the slice VAE; whole volumes feed the 3D baselines.
Each process reads only the rows of the global batch its devices hold, and a
background thread prepares the next batches while the device trains.
"""

import concurrent.futures
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from slicevae_jax.data.cache import VolumeCache


def _seed_words(seed: int | Sequence[int]) -> tuple[int, ...]:
  return tuple(int(s) for s in np.atleast_1d(seed))


class SliceSampler:
  """Maps a step number to the (array row, slice index) pairs of its global batch.

  Args:
    cache: the volume cache.
    subjects: subject indices to draw from (e.g. cache.split('train')).
    batch_size: global batch size.
    seed: stream seed: an int or seed words such as `rng.entropy(seed, name)`;
      epoch e permutes with default_rng([*seed, e]).
    shuffle: True: uniform permutation of all pairs per epoch. False: the
      reference's order, one volume's slices in sequence (volumes permuted per
      epoch), so a batch is a run of consecutive slices.
  """

  def __init__(self, cache: VolumeCache, subjects: Sequence[int], batch_size: int,
               seed: int | Sequence[int], shuffle: bool = True):
    if not len(subjects):
      raise ValueError(f"{cache.path}: no subjects to draw slices from")
    self.rows = cache.rows(subjects)
    self.num_slices = cache.stack_shape[0]
    self.batch_size = int(batch_size)
    self.seed = _seed_words(seed)
    self.shuffle = shuffle
    self.num_pairs = len(self.rows) * self.num_slices
    self._lock = threading.Lock()
    self._epoch_cache: dict[int, np.ndarray] = {}

  def _epoch(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._epoch_cache.get(epoch)
      if perm is None:
        rng = np.random.default_rng([*self.seed, epoch])
        if self.shuffle:
          perm = rng.permutation(self.num_pairs)
        else:
          order = rng.permutation(len(self.rows))
          perm = (order[:, None] * self.num_slices + np.arange(self.num_slices)).ravel()
        if len(self._epoch_cache) > 4:
          self._epoch_cache.pop(min(self._epoch_cache))
        self._epoch_cache[epoch] = perm
      return perm

  def pairs(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [B], slice indices [B]) of the global batch at `step`."""
    start = step * self.batch_size
    out, need = [], self.batch_size
    while need:
      epoch, offset = divmod(start, self.num_pairs)
      take = self._epoch(epoch)[offset:offset + need]
      out.append(take)
      need -= len(take)
      start += len(take)
    flat = np.concatenate(out)
    vol, sl = np.divmod(flat, self.num_slices)
    return self.rows[vol], sl

  def epoch_of(self, step: int) -> float:
    return step * self.batch_size / self.num_pairs


class VolumeSampler:
  """Maps a step number to the array rows of its global batch of whole volumes.

  One seeded permutation of the subjects per epoch; batches run across epoch ends.
  `seed` as for `SliceSampler`.
  """

  def __init__(self, cache: VolumeCache, subjects: Sequence[int], batch_size: int,
               seed: int | Sequence[int]):
    if not len(subjects):
      raise ValueError(f"{cache.path}: no subjects to draw volumes from")
    self.rows = cache.rows(subjects)
    self.batch_size = int(batch_size)
    self.seed = _seed_words(seed)

  def volumes(self, step: int) -> np.ndarray:
    """Array rows [B] of the global batch at `step`."""
    n = len(self.rows)
    flat = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    epochs, offsets = np.divmod(flat, n)
    perms = {int(e): np.random.default_rng([*self.seed, int(e)]).permutation(n)
             for e in np.unique(epochs)}
    return self.rows[[perms[int(e)][o] for e, o in zip(epochs, offsets)]]

  def epoch_of(self, step: int) -> float:
    return step * self.batch_size / len(self.rows)


def load_volume_batch(cache: VolumeCache, sampler: VolumeSampler, step: int,
                      local_rows: np.ndarray) -> np.ndarray:
  """This process's part of the volume batch at `step`: float32 [b, X, Y, Z, 1] in [-1, 1]."""
  rows = sampler.volumes(step)[local_rows]
  return np.stack([cache.volume_at_row(int(r)) for r in rows])[..., None] * 2.0 - 1.0


def load_batch(cache: VolumeCache, sampler: SliceSampler, step: int,
               local_rows: np.ndarray) -> np.ndarray:
  """This process's part of the batch at `step`: float32 [b, H, W, 1]."""
  rows, sl = sampler.pairs(step)
  return cache.gather(rows[local_rows], sl[local_rows])[..., None]


def prefetch(load: Callable[[int], Any], start: int, stop: int,
             depth: int = 2) -> Iterator[tuple[int, Any]]:
  """Yields (step, load(step)) for steps [start, stop), loading `depth` steps ahead."""
  depth = max(int(depth), 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=depth,
                                             thread_name_prefix="batches") as pool:
    pending: dict[int, concurrent.futures.Future] = {}
    for step in range(start, min(start + depth, stop)):
      pending[step] = pool.submit(load, step)
    for step in range(start, stop):
      batch = pending.pop(step).result()
      ahead = step + depth
      if ahead < stop:
        pending[ahead] = pool.submit(load, ahead)
      yield step, batch
