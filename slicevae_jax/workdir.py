"""Every path under a workdir, config.json in and out, and the workdir's lock and write check.

Where it sits: every stage reads and writes its files here, through the functions below,
so this module is the one map of a workdir (in the order the stages fill it):

  <workdir>/
    .lock                  held by the run using the workdir (`lock`)
    config.json            the resolved config (`save_config`, `load_config`, `record_config`)
    preprocess.json        how a new scan reaches the model's grid (`recipe_file`)
    cache/                 preprocessed volumes (data/cache.py), or data.cache_dir (`cache_dir`)
    checkpoints/<step>/    orbax checkpoints of a training run (`checkpoint_dir`)
    metrics.jsonl tb/ images/   the training loop's scalars, TensorBoard and picture grids
    baseline_meta.json     a 3D baseline's grid affine for sampling (`baseline_meta`)
    latent_gaussian.npz    the fitted latent model; latent_<model>.npz, the report's others
    samples/               sample_XXXX.nii.gz + .png, then samples.json (`samples_dir`)
    segmenter/             the RAS segmenter: a training run of its own (`segmenter_dir`)
    eval/                  metrics.json, report.md, PNGs, real_row.json (`eval_dir`)

A model comparison (pipeline.compare) holds one such workdir per model, `<workdir>/<model>/`,
beside the shared cache, segmenter and eval/ (with comparison.json) and timing.json.
"""

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from typing import Any, Iterator

import jax
import ml_collections

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import config_lib
from slicevae_jax import fileio
from slicevae_jax.errors import ConfigError, DataError

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
LATENT_FILE = "latent_gaussian.npz"
RECIPE_FILE = "preprocess.json"
BUNDLE_FILE = "bundle.json"
SCORE_REFERENCE_FILE = "score_reference.npz"
SAMPLES_INDEX = "samples.json"
# The files of an evaluation folder (eval/, or any folder evaluate_folders writes to).
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
RAS_CHART = "ras_per_label.png"
REAL_ROW_FILE = "real_row.json"
REAL_DICE_FILE = "real_row_dice.npz"
COMPARISON_FILE = "comparison.json"

# Config groups that must not change under an existing checkpoint.
_FROZEN = ("model_type", "model", "baseline", "data.grid", "data.slice_axis")
# Keys inside them that only inference reads: a trained workdir may switch them
# (the latent fit and the samples record them, so `all` redoes those stages).
_UNFROZEN = ("model.bn_mode",)


# ---------------------------------------------------------------------------------------------
# Paths, in the order the stages write them.


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The cache a run reads: data.cache_dir when set (shared caches), else <workdir>/cache."""
  return config.data.cache_dir or os.path.join(workdir, "cache")


def recipe_file(workdir: str) -> str:
  """The preprocessing recipe new scans go through (density modes, bundles)."""
  return os.path.join(workdir, RECIPE_FILE)


def is_bundle(path: str) -> bool:
  """True if `path` is a model bundle (bundle.py): a read-only workdir without data."""
  return os.path.isfile(os.path.join(path, BUNDLE_FILE))


def score_reference(path: str) -> str:
  """A bundle's stored scores of its held-out volumes (`--mode=score` ranks against them)."""
  return os.path.join(path, SCORE_REFERENCE_FILE)


def checkpoint_dir(run_dir: str) -> str:
  """Orbax checkpoints of the training run in `run_dir` (a workdir, or its segmenter/)."""
  return os.path.join(run_dir, "checkpoints")


def metrics_log(run_dir: str) -> str:
  """The training loop's scalars, one JSON object a line."""
  return os.path.join(run_dir, "metrics.jsonl")


def tensorboard_dir(run_dir: str) -> str:
  return os.path.join(run_dir, "tb")


def training_image(run_dir: str, step: int) -> str:
  """The picture grid the training loop writes at evaluation `step`."""
  return os.path.join(run_dir, "images", f"train_{step:07d}.png")


def baseline_meta(workdir: str) -> str:
  """What a 3D baseline's sampling needs from the cache (affine, grid), written at training."""
  return os.path.join(workdir, "baseline_meta.json")


def latent_file(workdir: str, kind: str | None = None) -> str:
  """The latent model file: the main one (latent.model), or the report's extra `kind`."""
  return os.path.join(workdir, LATENT_FILE if kind is None else f"latent_{kind}.npz")


def samples_dir(workdir: str) -> str:
  return os.path.join(workdir, "samples")


def samples_index(workdir: str) -> str:
  """samples.json, written last: its presence means the sample set is complete."""
  return os.path.join(samples_dir(workdir), SAMPLES_INDEX)


def segmenter_dir(workdir: str) -> str:
  """The RAS segmenter's own training run (checkpoints, metrics) inside a workdir."""
  return os.path.join(workdir, "segmenter")


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, "eval")


def model_dir(workdir: str, model: str) -> str:
  """A model comparison's workdir for one model."""
  return os.path.join(workdir, model)


def timing_file(workdir: str) -> str:
  """A model comparison's wall time per model."""
  return os.path.join(workdir, "timing.json")


def latest_step(run_dir: str) -> int | None:
  """Newest finished checkpoint step of `run_dir`, from the listing alone (no orbax manager:
  creating one is a collective in multi-host runs, and this is asked before stages start)."""
  steps = ckpt_lib.finished_steps(checkpoint_dir(run_dir))
  return max(steps) if steps else None


# ---------------------------------------------------------------------------------------------
# config.json.


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  fileio.write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a workdir was trained with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing; is {workdir} a slicevae_jax workdir?")
  config = config_lib.base_config()
  _merge(config, fileio.read_json(path))
  return config_lib.validate(config)


def _merge(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
  for k, v in values.items():
    if isinstance(v, dict) and k in config and isinstance(config[k], ml_collections.ConfigDict):
      _merge(config[k], v)
    elif k in config and isinstance(config[k], tuple):
      config[k] = tuple(v)
    else:
      config[k] = v


def _frozen_part(flat: dict, key: str):
  """The value of dotted `key` in a config read as JSON, less the `_UNFROZEN` keys inside it."""
  value = flat
  for part in key.split("."):
    value = value.get(part) if isinstance(value, dict) else None
  if isinstance(value, dict):
    value = {k: v for k, v in value.items() if f"{key}.{k}" not in _UNFROZEN}
  return value


def _frozen_diff(old: dict, new: dict) -> list[str]:
  return [key for key in _FROZEN
          if json.dumps(_frozen_part(old, key), sort_keys=True)
          != json.dumps(_frozen_part(new, key), sort_keys=True)]


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config; refuses a changed model under existing checkpoints."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path) and os.path.isdir(checkpoint_dir(workdir)):
    diffs = _frozen_diff(fileio.read_json(path), json.loads(config.to_json_best_effort()))
    if diffs:
      raise ConfigError(f"{workdir} holds checkpoints of a different model "
                        f"({', '.join(diffs)} changed); use a new --workdir")
  if jax.process_index() == 0:
    save_config(config, workdir)


# ---------------------------------------------------------------------------------------------
# One run at a time, on a disk that takes writes.

# What a read-only, full or forbidden workdir raises; any other OSError is a bug to see whole.
DISK_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def disk_error(workdir: str, err: OSError) -> DataError:
  """One line for a write that failed on the disk; every output is atomic, so none is torn."""
  step = latest_step(workdir)
  kept = (f"the finished checkpoints are intact (newest: step {step})" if step is not None
          else "no checkpoint was written yet")
  return DataError(f"{err.filename or workdir}: cannot write ({err.strerror}); {kept} and no "
                   f"output is half-written; free space or make {workdir} writable, then rerun "
                   f"the same command to resume")


def check_writable(workdir: str) -> None:
  """Creates `workdir` and proves a file can be written there, before any work starts."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise DataError(f"{workdir}: the workdir is a file, not a folder; choose another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    if e.errno not in DISK_ERRNOS and e.errno != errno.ENOTDIR:
      raise
    raise DataError(f"{workdir}: cannot write to the workdir ({e.strerror}); choose a "
                    f"writable --workdir") from e


@contextlib.contextmanager
def lock(workdir: str, config: ml_collections.ConfigDict, mode: str) -> Iterator[None]:
  """Holds `<workdir>/.lock` for one run, so a second run on the workdir refuses to start.

  An flock, so the kernel releases it when the process ends, however it ends: no stale
  lock to delete by hand. Only process 0 of a multi-host run takes it, and independent
  preprocessing shard jobs (data.num_shards > 1) share a workdir by design.
  """
  if jax.process_index() != 0 or (mode == "preprocess" and int(config.data.num_shards) > 1):
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
      raise DataError(f"{workdir}: another run is using this workdir (process {holder} holds "
                      f"{path}); wait for it to finish or choose another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    yield
  finally:
    os.close(fd)   # releases the lock
