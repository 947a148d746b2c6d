"""The stages in order: preprocess -> train -> fit_latent -> sample -> evaluate.

`run(config, workdir, mode)` is what `main.py` calls and what a notebook can
call. With mode 'all', a stage whose output already exists and is current is
skipped (an unfinished training run resumes from its newest checkpoint), and
evaluate is skipped with a warning when the real volumes have no labels.
A 3D baseline (config.model_type != 'slice_vae') has the same stages except
fit_latent: its generator samples from N(0, I) directly.
"""

import contextlib
import errno
import fcntl
import json
import os
import tempfile
import time

import jax
import ml_collections
from absl import logging

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import config_lib
from slicevae_jax import density_stages
from slicevae_jax import evaluate as evaluate_lib
from slicevae_jax import fileio
from slicevae_jax import fit_latent as fit_latent_lib
from slicevae_jax import inference
from slicevae_jax import parallel
from slicevae_jax import sample as sample_lib
from slicevae_jax import staleness
from slicevae_jax import train as train_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError, DataError

# Config groups that must not change under an existing checkpoint.
_FROZEN = ("model_type", "model", "baseline", "data.grid", "data.slice_axis")
# Keys inside them that only inference reads: a trained workdir may switch them
# (the latent fit and the samples record them, so `all` redoes those stages).
_UNFROZEN = ("model.bn_mode",)


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.cache_dir or os.path.join(workdir, "cache")


def prepare_cache(config: ml_collections.ConfigDict, workdir: str,
                  wait_seconds: float = 24 * 3600) -> VolumeCache | None:
  """Builds the cache once (resuming an interrupted build) or opens the finished one.

  Real data is split over processes: in a multi-host run each process takes
  the shard of its process index; with data.num_shards > 1 in one process,
  this call does its shard and returns None if others are still running.
  """
  path = cache_dir(config, workdir)
  if VolumeCache.exists(path):
    cache = VolumeCache(path)
    _check_cache(config, cache)
    return cache
  n_proc = jax.process_count()
  if config.data.source == "synthetic":
    from slicevae_jax.data import synth  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
      cache = synth.build_synthetic_cache(config, path)
    else:
      cache = _wait_for(path, wait_seconds)
  else:
    from slicevae_jax.data import preprocess  # pylint: disable=import-outside-toplevel
    if not config.data.root:
      raise ConfigError("config key 'data.root' is empty: set it to a folder of NIfTI "
                        "volumes (e.g. --config.data.root=/data/HCP)")
    shard = (jax.process_index(), n_proc) if n_proc > 1 else None
    cache = preprocess.build_cache(config, path, shard=shard)
    if cache is None and n_proc > 1:
      cache = _wait_for(path, wait_seconds)
    if cache is None:
      return None
  _check_cache(config, cache)
  return cache


def _wait_for(path: str, seconds: float) -> VolumeCache:
  """Waits for another process to finish the cache (multi-host preprocessing)."""
  deadline = time.time() + seconds
  while not VolumeCache.exists(path):
    if time.time() > deadline:
      raise DataError(f"{path}: still unfinished after {seconds:.0f} s of waiting for the "
                      f"other processes' preprocessing shards")
    time.sleep(2.0)
  return VolumeCache(path)


# Cache record keys (manifest top level, then 'settings' flattened with '.') -> what to change.
_CACHE_NAMES = {
    "seed": "seed",
    "dtype": "data.cache_dtype",
    "generator_version": "synth.GENERATOR_VERSION (the synthetic generator's code)",
    "preprocess_version": "preprocess.PREPROCESS_VERSION (the preprocessing code)",
}


def _flatten(settings: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in settings.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _cache_record(config: ml_collections.ConfigDict) -> dict:
  """What a cache built from `config` records, flattened as `_check_cache` compares it.

  The builder's own settings (`preprocess._settings` or `synth._settings`: voxel
  size, intensity recipe, label map, synthetic settings and generator version...)
  plus the manifest's grid, slice axis, dtype and source.
  """
  # pylint: disable=import-outside-toplevel,protected-access
  d = config.data
  if d.source == "synthetic":
    from slicevae_jax.data import synth
    settings = synth._settings(config)
  else:
    from slicevae_jax.data import preprocess
    settings = preprocess._settings(d)
  g = int(d.grid)
  return {**_flatten(settings), "grid": [g, g, g], "slice_axis": int(d.slice_axis),
          "dtype": str(d.cache_dtype), "source": str(d.source)}


def _check_cache(config, cache: VolumeCache) -> None:
  """Refuses a cache built with other data settings than `config`'s (ConfigError).

  Settings an older cache does not record cannot be checked: logged, not refused.
  """
  m = cache.manifest
  recorded = {**_flatten(m.get("settings") or {}),
              **{k: m[k] for k in ("grid", "slice_axis", "dtype", "source") if k in m}}
  wanted = _cache_record(config)
  changed, missing = staleness.changes(recorded, wanted)
  if missing:
    logging.warning("%s does not record %s; cannot check them against the config", cache.path,
                    ", ".join(_CACHE_NAMES.get(k, "data." + k) for k in missing))
  if changed:
    diffs = "; ".join(f"{_CACHE_NAMES.get(k, 'data.' + k)}: cached {recorded[k]!r}, "
                      f"configured {wanted[k]!r}" for k in changed)
    raise ConfigError(
        f"{cache.path} was built with other data settings ({diffs}); use another "
        f"data.cache_dir (or --workdir), or delete {cache.path} to rebuild it with these")


def _flat(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


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
  path = os.path.join(workdir, inference.CONFIG_FILE)
  has_ckpt = os.path.isdir(os.path.join(workdir, train_lib.CHECKPOINT_DIR))
  if os.path.exists(path) and has_ckpt:
    diffs = _frozen_diff(fileio.read_json(path), _flat(config))
    if diffs:
      raise ConfigError(f"{workdir} holds checkpoints of a different model "
                        f"({', '.join(diffs)} changed); use a new --workdir")
  if jax.process_index() == 0:
    inference.save_config(config, workdir)


def _sync(name: str) -> None:
  """Barrier across processes, so every process decides on the same files."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _latest_step(workdir: str) -> int | None:
  # A directory listing, not a CheckpointManager: creating a manager is a
  # collective in multi-host runs, and this is called before stages start.
  steps = ckpt_lib.finished_steps(os.path.join(workdir, train_lib.CHECKPOINT_DIR))
  return max(steps) if steps else None


# What a read-only, full or forbidden workdir raises; any other OSError is a bug to see whole.
_DISK_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _disk_error(workdir: str, err: OSError) -> DataError:
  """One line for a write that failed on the disk; every output is atomic, so none is torn."""
  steps = ckpt_lib.finished_steps(os.path.join(workdir, train_lib.CHECKPOINT_DIR))
  kept = (f"the finished checkpoints are intact (newest: step {max(steps)})" if steps
          else "no checkpoint was written yet")
  return DataError(f"{err.filename or workdir}: cannot write ({err.strerror}); {kept} and no "
                   f"output is half-written; free space or make {workdir} writable, then rerun "
                   f"the same command to resume")


def _check_writable(workdir: str) -> None:
  """Creates `workdir` and proves a file can be written there, before any work starts."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise DataError(f"{workdir}: the workdir is a file, not a folder; choose another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write-test-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    if e.errno not in _DISK_ERRNOS and e.errno != errno.ENOTDIR:
      raise
    raise DataError(f"{workdir}: cannot write to the workdir ({e.strerror}); choose a "
                    f"writable --workdir") from e


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str, config: ml_collections.ConfigDict, mode: str):
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


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "all",
        evaluate: bool = True, density: density_stages.Options | None = None) -> None:
  """Runs one stage, or every stage that is not done yet (mode 'all').

  `evaluate=False` leaves the evaluate stage out of 'all' (the model comparison
  scores every model itself, with one shared segmenter). A workdir that cannot be
  written (read-only, full disk) or that another run is using stops the run with a
  DataError naming the file. The density modes (score, complete, interpolate) read a
  trained workdir with the config it was trained with and write only their output
  folder, `density` (inputs, output folder, ...); they take no lock.
  """
  if mode not in config_lib.MODES:
    raise ConfigError(f"unknown mode {mode!r}; choose one of {list(config_lib.MODES)}")
  config_lib.validate(config)
  if mode in config_lib.DENSITY_MODES:
    stored = inference.load_config(workdir)
    path = cache_dir(stored, workdir)
    if not VolumeCache.exists(path):
      raise DataError(f"{path}: no cache; --mode={mode} scores against the workdir's "
                      f"held-out volumes and needs a trained workdir")
    density_stages.run(workdir, mode, density or density_stages.Options(), VolumeCache(path))
    return
  if mode == "fit_latent" and config.model_type != "slice_vae":
    raise ConfigError(f"--mode=fit_latent fits the slice VAE's latent Gaussian; model_type="
                      f"{config.model_type!r} samples its prior directly and has no such stage")
  _check_writable(workdir)
  try:
    with workdir_lock(workdir, config, mode):
      _run_stages(config, workdir, mode, evaluate)
  except OSError as e:
    if e.errno not in _DISK_ERRNOS:
      raise
    raise _disk_error(workdir, e) from e


def _run_stages(config: ml_collections.ConfigDict, workdir: str, mode: str,
                evaluate: bool) -> None:
  """`run`'s stages, once the arguments are checked and the workdir is writable."""
  record_config(config, workdir)
  mesh = parallel.make_mesh()
  everything = mode == "all"
  cache = prepare_cache(config, workdir)
  if cache is None:
    if mode == "preprocess":
      return
    raise DataError(f"{cache_dir(config, workdir)}: other preprocessing shards are not done "
                    f"yet (data.num_shards={config.data.num_shards}); rerun when they are")
  logging.info("cache %s: %d subjects (%d train, %d val), stacks %s", cache.path, len(cache),
               len(cache.split("train")), len(cache.split("val")), cache.stack_shape)
  if jax.process_index() == 0:
    density_stages.write_recipe(config, workdir, cache)   # what new scans are brought to
  if mode == "preprocess":
    return
  slice_vae = config.model_type == "slice_vae"
  if not slice_vae:
    from slicevae_jax import baseline_stages  # pylint: disable=import-outside-toplevel
  if mode == "train" or everything:
    _sync("slicevae:train")
    step = _latest_step(workdir)
    if everything and step is not None and step >= config.train.num_steps:
      logging.info("train: done (checkpoint at step %d), skipped", step)
    elif slice_vae:
      train_lib.train(config, workdir, cache, mesh)
    else:
      baseline_stages.train(config, workdir, cache, mesh)
  _sync("slicevae:fit_latent")
  step = _latest_step(workdir)
  if slice_vae and (mode == "fit_latent" or everything):
    if step is None:
      raise DataError(f"{workdir}: no checkpoint; run --mode=train first")
    if everything and fit_latent_lib.is_current(workdir, config, step):
      logging.info("fit_latent: current for step %d, skipped", step)
    else:
      fit_latent_lib.fit_latent(config, workdir, cache, mesh)
  if mode == "sample" or everything:
    _sync("slicevae:sample")
    if everything and sample_lib.is_current(workdir, config, step):
      logging.info("sample: current for step %d, skipped", step)
    elif slice_vae:
      sample_lib.write_samples(config, workdir, mesh)
    else:
      baseline_stages.write_samples(config, workdir, mesh)
  if mode == "evaluate" or (everything and evaluate):
    _sync("slicevae:evaluate")
    if everything and not cache.manifest.get("has_labels"):
      logging.warning("evaluate: skipped, the real volumes in %s have no labels (the RAS needs "
                      "them); give label files and run --mode=evaluate", cache.path)
    elif everything and evaluate_lib.is_current(workdir):
      logging.info("evaluate: current for the samples in %s, skipped", workdir)
    else:
      evaluate_lib.evaluate_workdir(config, workdir, cache, mesh)
