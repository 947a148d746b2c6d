"""Training scalars -> <run>/metrics.jsonl and TensorBoard (tensorboardX, no TensorFlow).

Where it sits: the training loop (trainer.run) writes through it once per log interval;
tests and notebooks read the JSON lines back with `read_metrics`.
"""

import json
import os
from typing import Any

import jax
import numpy as np

from slicevae_jax import workdir as workdir_lib


class MetricWriter:
  """Appends scalars to <run_dir>/metrics.jsonl and TensorBoard; only process 0 writes."""

  def __init__(self, run_dir: str, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = workdir_lib.metrics_log(run_dir)
    self._tb = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(workdir_lib.tensorboard_dir(run_dir))

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    if not self.active:
      return
    clean = {k: float(np.asarray(v)) for k, v in values.items()}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """A 2D uint8 image."""
    if self.active and self._tb is not None:
      self._tb.add_image(name, image[None], int(step), dataformats="CHW")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(run_dir: str) -> list[dict[str, float]]:
  """All records of <run_dir>/metrics.jsonl (for tests and notebooks)."""
  path = workdir_lib.metrics_log(run_dir)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
