r"""Model comparison: every model on one data set with one budget -> one Table-1 report.

  python -m slicevae_jax.compare --config=configs/compare.py --workdir=runs/compare

Trains the slice VAE and the 3D baselines listed in `compare.models` on one
shared cache, each in `<workdir>/<model>/` through the ordinary stages (so an
interrupted comparison resumes: finished models are skipped, an unfinished one
resumes from its checkpoint), samples `sample.num_volumes` volumes from each,
trains one RAS segmenter in `<workdir>/segmenter/`, and scores every model
against the same held-out real volumes with the same settings. Writes
`<workdir>/eval/report.md` (Table 1 layout, Fig. 4 RAS chart, per-model
overlays and montages), `<workdir>/eval/comparison.json` (every number, the
budget, the training time of each model) and each model's own
`<workdir>/eval/<model>/metrics.json`. A rerun whose samples are unchanged
returns the stored comparison.

The budget is stated in epochs: every model sees `compare.epochs` passes over
the training volumes (the slice VAE counts slices / slices per volume), which
sets each model's number of steps from its batch size.
"""

import math
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from slicevae_jax import config_lib
from slicevae_jax import evaluate as evaluate_lib
from slicevae_jax import fileio
from slicevae_jax import parallel
from slicevae_jax import pipeline
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError

DISPLAY = {"slice_vae": "Ours (slice VAE)", "wgan_gp": "3D WGAN-GP", "vae_gan": "3D VAE-GAN",
           "alpha_gan": "3D α-GAN", "alpha_wgan": "3D α-WGAN", "vae3d": "3D VAE"}
TIMING_FILE = "timing.json"
RESULT_FILE = "comparison.json"


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
    c = config_lib.as_baseline(config, model)
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
  path = os.path.join(workdir, model, "samples", "samples.json")
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, samples and scores every model of `compare.models`; returns comparison.json."""
  config_lib.validate(config)
  models = list(config.compare.models)
  if not models:
    raise ConfigError("config key 'compare.models' is empty; list the models to compare")
  os.makedirs(workdir, exist_ok=True)
  cache_path = config.data.cache_dir or os.path.join(workdir, "cache")
  shared = ml_collections.ConfigDict(config.to_dict())
  shared.data.cache_dir = cache_path
  pipeline.record_config(shared, workdir)
  cache = pipeline.prepare_cache(shared, workdir)
  if cache is None:
    raise ConfigError("compare: preprocessing is split into shards; finish them first")
  mesh = parallel.make_mesh()
  timing_path = os.path.join(workdir, TIMING_FILE)

  configs = {}
  for model in models:
    c = model_config(shared, model, cache, cache_path)
    configs[model] = c
    model_dir = os.path.join(workdir, model)
    logging.info("compare: %s, %d steps of %d %ss", model, c.train.num_steps,
                 c.train.batch_size, "slice" if model == "slice_vae" else "volume")
    # Stage 'all' without evaluation: skips what is done, resumes what is not.
    _timed(timing_path, model, lambda: pipeline.run(c, model_dir, "all", evaluate=False))

  out_dir = os.path.join(workdir, evaluate_lib.EVAL_DIR)
  scored = {m: _samples_index(workdir, m) for m in models}
  previous = os.path.join(out_dir, RESULT_FILE)
  if os.path.exists(previous):
    old = fileio.read_json(previous)
    if old.get("models") == models and old.get("samples") == scored:
      logging.info("compare: %s already scores these samples, nothing to do", previous)
      return old

  real, labels, names = evaluate_lib.labelled_val(cache, int(shared.eval.num_real))
  seg = evaluate_lib.ensure_segmenter(shared, workdir, cache, mesh)
  rows, real_row, per_model = [], None, {}
  for model in models:
    paths = evaluate_lib.list_nifti(os.path.join(workdir, model, "samples"),
                                    f"{model} samples")
    generated = evaluate_lib.load_set(paths, f"{model} samples")
    result = evaluate_lib.evaluate_volumes(
        shared, generated, real, labels, seg, names, cache.slice_axis,
        os.path.join(out_dir, model), name=DISPLAY.get(model, model), mesh=mesh,
        extra={"workdir": os.path.join(workdir, model)})
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
    evaluate_lib.write_report(rows, real_row, out_dir, label_names=names,
                              title=f"Model comparison: {shared.name}", notes=notes)
    fileio.write_json(os.path.join(out_dir, RESULT_FILE), comparison)
  logging.info("compare: report in %s", os.path.join(out_dir, evaluate_lib.REPORT_FILE))
  return comparison


def _cli(argv: list[str]) -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from slicevae_jax.errors import run_command  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS

  def body():
    config_lib.validate(f.config)
    parallel.initialize_distributed(f.config.dist)
    run(f.config, f.workdir)
  run_command(argv, body)


if __name__ == "__main__":
  from absl import app as _app, flags as _flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Comparison config, e.g. configs/compare.py.",
                                  lock_config=True)
  _flags.DEFINE_string("workdir", None, "Folder for the shared cache, every model and the report.")
  _flags.mark_flags_as_required(["config", "workdir"])
  _app.run(_cli)
