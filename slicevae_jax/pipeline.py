"""The stages in order: preprocess -> train -> fit_latent -> sample -> evaluate, for every family.

`run(config, workdir, mode)` is what `main.py` calls and what a notebook can
call. With mode 'all', a stage whose output already exists and is current is
skipped (an unfinished training run resumes from its newest checkpoint), and
evaluate is skipped with a warning when the real volumes have no labels.
Each model family plugs into the same stages through a `Family`: the slice VAE
(slicevae/) and the 3D baselines (baselines/), which have no fit_latent stage
(their generators sample N(0, I) directly). `compare` runs every family on one
data set with one budget and scores them in one report.
"""

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from slicevae_jax import config_lib
from slicevae_jax import fileio
from slicevae_jax import parallel
from slicevae_jax import staleness
from slicevae_jax import viz
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.baselines import stages as baseline_stages
from slicevae_jax.data import nifti
from slicevae_jax.data import preprocess
from slicevae_jax.data import synth
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError, DataError
from slicevae_jax.eval import evaluate as evaluate_lib
from slicevae_jax.eval import report
from slicevae_jax.eval import segmenter as seg_lib
from slicevae_jax.slicevae import density_stages
from slicevae_jax.slicevae import fit_latent as fit_latent_lib
from slicevae_jax.slicevae import sample as slicevae_sample
from slicevae_jax.slicevae import train as slicevae_train

MODES = ("preprocess", "train", "fit_latent", "sample", "evaluate", "all")

# (sample_fn(start, num) -> volumes [num, X, Y, Z] in [0, 1], grid affine, samples.json record)
Sampler = tuple[Callable[[int, int], np.ndarray], np.ndarray, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Family:
  """What the stages ask of a model family.

  Attributes:
    train: (config, workdir, cache, mesh) -> final state; resumes from the workdir.
    sampler: (config, workdir, mesh) -> `Sampler` of the trained model.
    sample_inputs: (config, workdir) -> what its samples depend on beyond checkpoint
      step, count and seed (recorded in samples.json; a change means resampling).
    fit_latent: (config, workdir, cache, mesh) -> latent model, or None (no such stage).
    latent_current: (workdir, config, step) -> whether the latent fit is current.
  """
  train: Callable[..., Any]
  sampler: Callable[..., Sampler]
  sample_inputs: Callable[[ml_collections.ConfigDict, str], dict[str, Any]]
  fit_latent: Callable[..., Any] | None = None
  latent_current: Callable[[str, ml_collections.ConfigDict, int], bool] | None = None


SLICE_VAE = Family(train=slicevae_train.train, sampler=slicevae_sample.sampler,
                   sample_inputs=slicevae_sample.sample_inputs,
                   fit_latent=fit_latent_lib.fit_latent, latent_current=fit_latent_lib.is_current)
BASELINE = Family(train=baseline_stages.train, sampler=baseline_stages.sampler,
                  sample_inputs=lambda config, workdir: {})


def family(config: ml_collections.ConfigDict) -> Family:
  """The family that trains and samples `config.model_type`."""
  return SLICE_VAE if config.model_type == "slice_vae" else BASELINE


# ---------------------------------------------------------------------------------------------
# Preprocess: the cache.


def prepare_cache(config: ml_collections.ConfigDict, workdir: str,
                  wait_seconds: float = 24 * 3600) -> VolumeCache | None:
  """Builds the cache once (resuming an interrupted build) or opens the finished one.

  Real data is split over processes: in a multi-host run each process takes
  the shard of its process index; with data.num_shards > 1 in one process,
  this call does its shard and returns None if others are still running.
  """
  path = workdir_lib.cache_dir(config, workdir)
  if VolumeCache.exists(path):
    cache = VolumeCache(path)
    _check_cache(config, cache)
    return cache
  n_proc = jax.process_count()
  if config.data.source == "synthetic":
    if jax.process_index() == 0:
      cache = synth.build_synthetic_cache(config, path)
    else:
      cache = _wait_for(path, wait_seconds)
  else:
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

  The builder's own settings (`preprocess.settings` or `synth.settings`: voxel
  size, intensity recipe, label map, synthetic settings and generator version...)
  plus the manifest's grid, slice axis, dtype and source.
  """
  d = config.data
  settings = synth.settings(config) if d.source == "synthetic" else preprocess.settings(d)
  g = int(d.grid)
  return {**_flatten(settings), "grid": [g, g, g], "slice_axis": int(d.slice_axis),
          "dtype": str(d.cache_dtype), "source": str(d.source)}


def _check_cache(config: ml_collections.ConfigDict, cache: VolumeCache) -> None:
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


# ---------------------------------------------------------------------------------------------
# Sample: the family's sampler -> NIfTI files, PNGs and samples.json.


def samples_current(workdir: str, config: ml_collections.ConfigDict, step: int | None) -> bool:
  """True if `samples.json` records this step, count, seed and the family's sample inputs.

  Logs (INFO) what changed when it does not.
  """
  path = workdir_lib.samples_index(workdir)
  if not os.path.exists(path):
    return False
  wanted = dict(checkpoint_step=step, num_volumes=int(config.sample.num_volumes),
                seed=int(config.sample.seed), **family(config).sample_inputs(config, workdir))
  return not staleness.stale(path, fileio.read_json(path), wanted)


def write_samples(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> list[str]:
  """The sample stage: sample.num_volumes volumes of the trained model -> the NIfTI paths.

  Writes `<workdir>/samples/sample_XXXX.nii.gz` (RAS, the cache's grid affine and voxel
  size) and `sample_XXXX.png` (three orthogonal mid-slices), then `samples.json` last: its
  presence means the set is complete, and it records what the set was made from. Every
  process calls the sampler (it may be a collective); process 0 writes.
  """
  mesh = mesh or parallel.make_mesh()
  sample_fn, affine, record = family(config).sampler(config, workdir, mesh)
  out_dir = workdir_lib.samples_dir(workdir)
  num, batch = int(config.sample.num_volumes), int(config.sample.batch_volumes)
  paths = []
  for start in range(0, num, batch):
    vols = sample_fn(start, min(batch, num - start))
    if jax.process_index() != 0:
      continue
    for j, vol in enumerate(vols):
      name = f"sample_{start + j:04d}"
      path = os.path.join(out_dir, name + ".nii.gz")
      nifti.save_volume(path, vol, affine)
      if config.sample.png:
        viz.save_png(os.path.join(out_dir, name + ".png"), viz.three_planes(vol))
      paths.append(path)
  if jax.process_index() == 0:
    fileio.write_json(workdir_lib.samples_index(workdir), dict(
        record, num_volumes=num, seed=int(config.sample.seed),
        files=[os.path.basename(p) for p in paths], affine=np.asarray(affine).tolist()))
  logging.info("wrote %d samples to %s", len(paths), out_dir)
  return paths


# ---------------------------------------------------------------------------------------------
# The stages in order.


def _sync(name: str) -> None:
  """Barrier across processes, so every process decides on the same files."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "all",
        evaluate: bool = True) -> None:
  """Runs one stage, or every stage that is not done yet (mode 'all').

  `evaluate=False` leaves the evaluate stage out of 'all' (the model comparison
  scores every model itself, with one shared segmenter). A workdir that cannot be
  written (read-only, full disk) or that another run is using stops the run with a
  DataError naming the file.
  """
  if mode not in MODES:
    raise ConfigError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
  config_lib.validate(config)
  if mode == "fit_latent" and family(config).fit_latent is None:
    raise ConfigError(f"--mode=fit_latent fits the slice VAE's latent Gaussian; model_type="
                      f"{config.model_type!r} samples its prior directly and has no such stage")
  if workdir_lib.is_bundle(workdir) and mode != "sample":
    raise ConfigError(f"{workdir} is a model bundle: it has no data or training history, so "
                      f"only --mode=sample (and score, complete, interpolate) runs on it; train "
                      f"and evaluate need a workdir")
  workdir_lib.check_writable(workdir)
  try:
    with workdir_lib.lock(workdir, config, mode):
      _run_stages(config, workdir, mode, evaluate)
  except OSError as e:
    if e.errno not in workdir_lib.DISK_ERRNOS:
      raise
    raise workdir_lib.disk_error(workdir, e) from e


def _run_stages(config: ml_collections.ConfigDict, workdir: str, mode: str,
                evaluate: bool) -> None:
  """`run`'s stages, once the arguments are checked and the workdir is writable."""
  mesh = parallel.make_mesh()
  if mode == "sample" and workdir_lib.latest_step(workdir) is not None:
    # A trained model (a workdir or a bundle) samples without its data: no cache needed,
    # and a bundle's config.json stays the one it was exported with.
    if not workdir_lib.is_bundle(workdir):
      workdir_lib.record_config(config, workdir)
    _sync("slicevae:sample")
    write_samples(config, workdir, mesh)
    return
  workdir_lib.record_config(config, workdir)
  everything = mode == "all"
  cache = prepare_cache(config, workdir)
  if cache is None:
    if mode == "preprocess":
      return
    raise DataError(f"{workdir_lib.cache_dir(config, workdir)}: other preprocessing shards "
                    f"are not done yet (data.num_shards={config.data.num_shards}); rerun when "
                    f"they are")
  logging.info("cache %s: %d subjects (%d train, %d val), stacks %s", cache.path, len(cache),
               len(cache.split("train")), len(cache.split("val")), cache.stack_shape)
  if jax.process_index() == 0:
    density_stages.write_recipe(config, workdir, cache)   # what new scans are brought to
  if mode == "preprocess":
    return
  fam = family(config)
  if mode == "train" or everything:
    _sync("slicevae:train")
    step = workdir_lib.latest_step(workdir)
    if everything and step is not None and step >= config.train.num_steps:
      logging.info("train: done (checkpoint at step %d), skipped", step)
    else:
      fam.train(config, workdir, cache, mesh)
  _sync("slicevae:fit_latent")
  step = workdir_lib.latest_step(workdir)
  if fam.fit_latent is not None and (mode == "fit_latent" or everything):
    if step is None:
      raise DataError(f"{workdir}: no checkpoint; run --mode=train first")
    if everything and fam.latent_current(workdir, config, step):
      logging.info("fit_latent: current for step %d, skipped", step)
    else:
      fam.fit_latent(config, workdir, cache, mesh)
  if mode == "sample" or everything:
    _sync("slicevae:sample")
    if everything and samples_current(workdir, config, step):
      logging.info("sample: current for step %d, skipped", step)
    else:
      write_samples(config, workdir, mesh)
  if mode == "evaluate" or (everything and evaluate):
    _sync("slicevae:evaluate")
    if everything and not cache.manifest.get("has_labels"):
      logging.warning("evaluate: skipped, the real volumes in %s have no labels (the RAS needs "
                      "them); give label files and run --mode=evaluate", cache.path)
    elif everything and evaluate_lib.is_current(workdir):
      logging.info("evaluate: current for the samples in %s, skipped", workdir)
    else:
      evaluate_lib.evaluate_workdir(config, workdir, cache, mesh)


# ---------------------------------------------------------------------------------------------
# Every family on one data set with one budget -> one Table-1 report.

DISPLAY = {"slice_vae": "Ours (slice VAE)", "wgan_gp": "3D WGAN-GP", "vae_gan": "3D VAE-GAN",
           "alpha_gan": "3D α-GAN", "alpha_wgan": "3D α-WGAN", "vae3d": "3D VAE"}


def steps_for(config: ml_collections.ConfigDict, cache: VolumeCache, epochs: float) -> int:
  """Steps giving `epochs` passes over the training volumes at this config's batch size."""
  n_train = len(cache.split("train"))
  items = n_train * (cache.stack_shape[0] if config.model_type == "slice_vae" else 1)
  return max(1, math.ceil(epochs * items / int(config.train.batch_size)))


def model_config(config: ml_collections.ConfigDict, model: str, cache: VolumeCache,
                 cache_path: str) -> ml_collections.ConfigDict:
  """The config `model` trains with: shared data/cache, its own batch, lr and step count."""
  if model == "slice_vae":
    c = ml_collections.ConfigDict(config.to_dict())
    c.model_type = "slice_vae"
  else:
    c = baseline_stages.as_baseline(config, model)
    c.train.batch_size = int(config.compare.baseline_batch)
  c.name = model
  c.data.cache_dir = cache_path
  if float(config.compare.epochs) > 0:
    c.train.num_steps = steps_for(c, cache, float(config.compare.epochs))
    every = max(1, c.train.num_steps // 4)
    c.train.eval_every = c.train.checkpoint_every = every
    c.train.log_every = max(1, min(int(c.train.log_every), every))
  return config_lib.validate(c)


def _budget(c: ml_collections.ConfigDict, cache: VolumeCache) -> dict[str, Any]:
  per_volume = cache.stack_shape[0] if c.model_type == "slice_vae" else 1
  items = int(c.train.num_steps) * int(c.train.batch_size)
  return {"steps": int(c.train.num_steps), "batch_size": int(c.train.batch_size),
          "unit": "slice" if per_volume > 1 else "volume",
          "volumes_seen": items / per_volume,
          "epochs": items / per_volume / max(len(cache.split("train")), 1),
          "learning_rate": float(c.train.learning_rate)}


def _samples_index(workdir: str, model: str) -> Any:
  path = workdir_lib.samples_index(workdir_lib.model_dir(workdir, model))
  return fileio.read_json(path) if os.path.exists(path) else None


def _timed(timing_path: str, model: str, fn) -> None:
  """Runs fn() and adds its wall time to the model's entry (process 0 writes)."""
  start = time.perf_counter()
  fn()
  spent = time.perf_counter() - start
  if jax.process_index() == 0:
    timing = fileio.read_json(timing_path) if os.path.exists(timing_path) else {}
    timing[model] = timing.get(model, 0.0) + spent
    fileio.write_json(timing_path, timing)


def compare(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, samples and scores every model of `compare.models`; returns comparison.json.

  Each model trains in `<workdir>/<model>/` through `run` (so an interrupted comparison
  resumes: finished models are skipped, an unfinished one resumes from its checkpoint) on
  one shared cache, with the same number of passes over the training volumes
  (`compare.epochs`; the slice VAE counts slices / slices per volume), which sets each
  model's step count from its batch size. One RAS segmenter (`<workdir>/segmenter/`)
  scores every model against the same held-out volumes. Writes `<workdir>/eval/report.md`
  (Table 1, Fig. 4 RAS chart, per-model overlays and montages), `comparison.json` (every
  number, the budget, each model's wall time) and each model's own
  `<workdir>/eval/<model>/metrics.json`. A rerun whose samples are unchanged returns the
  stored comparison.
  """
  config_lib.validate(config)
  models = list(config.compare.models)
  if not models:
    raise ConfigError("config key 'compare.models' is empty; list the models to compare")
  os.makedirs(workdir, exist_ok=True)
  cache_path = workdir_lib.cache_dir(config, workdir)
  shared = ml_collections.ConfigDict(config.to_dict())
  shared.data.cache_dir = cache_path
  workdir_lib.record_config(shared, workdir)
  cache = prepare_cache(shared, workdir)
  if cache is None:
    raise ConfigError("compare: preprocessing is split into shards; finish them first")
  mesh = parallel.make_mesh()
  timing_path = workdir_lib.timing_file(workdir)

  configs = {}
  for model in models:
    c = model_config(shared, model, cache, cache_path)
    configs[model] = c
    model_dir = workdir_lib.model_dir(workdir, model)
    logging.info("compare: %s, %d steps of %d %ss", model, c.train.num_steps,
                 c.train.batch_size, "slice" if model == "slice_vae" else "volume")
    # Stage 'all' without evaluation: skips what is done, resumes what is not.
    _timed(timing_path, model, lambda: run(c, model_dir, "all", evaluate=False))

  out_dir = workdir_lib.eval_dir(workdir)
  scored = {m: _samples_index(workdir, m) for m in models}
  previous = os.path.join(out_dir, workdir_lib.COMPARISON_FILE)
  if os.path.exists(previous):
    old = fileio.read_json(previous)
    if old.get("models") == models and old.get("samples") == scored:
      logging.info("compare: %s already scores these samples, nothing to do", previous)
      return old

  real, labels, names = cache.held_out(int(shared.eval.num_real))
  seg = seg_lib.ensure_segmenter(shared, workdir, cache, mesh)
  rows, real_row, per_model = [], None, {}
  for model in models:
    paths = nifti.list_nifti(workdir_lib.samples_dir(workdir_lib.model_dir(workdir, model)),
                             f"{model} samples")
    generated = nifti.load_set(paths, f"{model} samples")
    result = evaluate_lib.evaluate_volumes(
        shared, generated, real, labels, seg, names, cache.slice_axis,
        os.path.join(out_dir, model), name=DISPLAY.get(model, model), mesh=mesh,
        extra={"workdir": workdir_lib.model_dir(workdir, model)})
    rows.append(result["model"])
    real_row = real_row or result["real"]
    per_model[model] = result["model"]

  timing = fileio.read_json(timing_path) if os.path.exists(timing_path) else {}
  budgets = {m: _budget(configs[m], cache) for m in models}
  notes = [f"Equal budget: {float(shared.compare.epochs):g} passes over the "
           f"{len(cache.split('train'))} training volumes per model "
           f"(0 = each config's own step count)."]
  for m in models:
    b = budgets[m]
    t = timing.get(m)
    notes.append(f"{DISPLAY.get(m, m)}: {b['steps']} steps × {b['batch_size']} {b['unit']}s, "
                 f"{b['volumes_seen']:.0f} volumes seen, lr {b['learning_rate']:g}"
                 + (f", {t / 60:.1f} min of wall time (training and sampling, "
                    f"{jax.devices()[0].device_kind})" if t else ""))
  if "slice_vae" in models and len(models) > 1:
    w = shared.baseline
    notes.append(f"Baseline widths: max_channels {w.max_channels}, latent {w.latent_dim}, code "
                 f"critic {w.code_hidden}, VAE-GAN heads {w.encoder_hidden} (paper: 512, 1000, "
                 f"4096, 2048).")
  comparison = {"models": models, "rows": per_model, "real": real_row, "budget": budgets,
                "wall_seconds": timing, "epochs": float(shared.compare.epochs),
                "device": jax.devices()[0].device_kind, "label_names": names,
                "samples": scored, "baseline": shared.baseline.to_dict()}
  if jax.process_index() == 0:
    report.write_report(rows, real_row, out_dir, label_names=names,
                        title=f"Model comparison: {shared.name}", notes=notes)
    fileio.write_json(os.path.join(out_dir, workdir_lib.COMPARISON_FILE), comparison)
  logging.info("compare: report in %s", os.path.join(out_dir, workdir_lib.REPORT_FILE))
  return comparison
