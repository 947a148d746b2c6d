"""Checkpoints of every training run: state <-> <run>/checkpoints/<step>/ (orbax).

Orbax writes each step into a temporary folder and renames it when complete,
so a killed run leaves either a whole checkpoint or none; `latest_step()` only
sees finished ones. Restores take an abstract target (from `jax.eval_shape`)
carrying the shardings, so the restored state lands where training needs it.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from slicevae_jax.errors import DataError


def finished_steps(directory: str) -> list[int]:
  """Steps of the finished checkpoints in `directory`, read from the listing alone.

  Orbax writes a step into a temporary folder and renames it to the bare step
  number when complete, so integer-named folders are exactly the finished ones.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


class Checkpointer:
  """Saves and restores a state pytree under `<directory>/<step>/`."""

  def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise DataError(f"{self.directory}: no checkpoints (train first)")
    # A read-only manager keeps and saves nothing; saying so up front spares orbax's
    # two warnings that it changed these options itself.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
        create=not read_only, read_only=read_only, enable_async_checkpointing=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of `state` at `step` (no-op if it exists)."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    logging.info("checkpoint saved at step %d -> %s", step, self.directory)

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores into the structure, dtypes and shardings of `target` (abstract ok)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise DataError(f"{self.directory}: no finished checkpoint to restore")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        target)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"{self.directory}/{step}: checkpoint does not match this config's "
                      f"model ({e})") from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_trained(directory: str, abstract: Any, step: int | None = None) -> tuple[Any, int]:
  """(state, step): a finished training run's checkpoint (newest unless `step`), read-only."""
  ckpt = Checkpointer(directory, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise DataError(f"{ckpt.directory}: no finished checkpoint; run --mode=train first")
    return ckpt.restore(abstract, step), int(step)
  finally:
    ckpt.close()
