"""Model bundle: a trained workdir -> one self-contained folder another group can use.

Where it sits: after the pipeline, beside the notebook API. `export(workdir, out)` copies
what inference needs and nothing it does not (no cache, no training history), so a bundle
is a read-only workdir: `load_for_inference(out)` and `--mode=sample --workdir=out` read it
as they read the workdir it came from.

  <out>/
    bundle.json            format version, source, step, files and their SHA-256
    README.md              the model card (data, grid, training, evaluation, use and limits)
    config.json            the resolved config of the training run
    config.py              get_config() reading config.json, for --config=<out>/config.py
    preprocess.json        the recipe a new scan goes through to reach the model's grid
    score_reference.npz    the held-out volumes' scores, which --mode=score ranks against
    checkpoints/<step>/    the newest slice VAE checkpoint
    latent_gaussian.npz    the main latent model; latent_<model>.npz, the others fitted
    segmenter/checkpoints/<step>/   the RAS segmenter, when the workdir trained one
    eval/metrics.json, eval/report.md   the workdir's evaluation, when it has one

The bundle is written into a temporary folder beside `out` and renamed into place, so a
reader never sees half a bundle, and an existing `out` is never overwritten.
"""

import datetime
import os
import shutil
import tempfile
from typing import Any

import ml_collections
import numpy as np

from slicevae_jax import __version__
from slicevae_jax import fileio
from slicevae_jax import metric_writer
from slicevae_jax import staleness
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError, DataError
from slicevae_jax.eval import report as report_lib
from slicevae_jax.slicevae import density
from slicevae_jax.slicevae import density_stages
from slicevae_jax.slicevae import inference

BUNDLE_FILE = workdir_lib.BUNDLE_FILE
CARD_FILE = "README.md"
FORMAT_VERSION = 1

_CONFIG_PY = '''"""The config of this model bundle, for --config=<bundle>/config.py (overrides work)."""

import os

from slicevae_jax import workdir


def get_config(arg=None):
  del arg
  return workdir.load_config(os.path.dirname(os.path.abspath(__file__)))
'''

_TEMPLATE_NOTICE = (
    "Trained on the embedded default data set: synthetic subjects made from the MNI ICBM152 "
    "2009c nonlinear symmetric template and the CerebrA atlas (one anatomy, deformed), so it "
    "is not a model of real anatomy. The template's notice, kept with everything derived from "
    "it:\n\n"
    "> Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University. Permission to use, copy, modify, and "
    "distribute this software and its documentation for any purpose and without fee is hereby "
    "granted, provided that the above copyright notice appear in all copies. The authors and "
    "McGill University make no representations about the suitability of this software for any "
    "purpose. It is provided \"as is\" without express or implied warranty.")


def _copy_newest_checkpoint(run_dir: str, dest_run_dir: str) -> int:
  step = workdir_lib.latest_step(run_dir)
  if step is None:
    raise DataError(f"{workdir_lib.checkpoint_dir(run_dir)}: no finished checkpoint to export; "
                    f"train first (--mode=train)")
  shutil.copytree(os.path.join(workdir_lib.checkpoint_dir(run_dir), str(step)),
                  os.path.join(workdir_lib.checkpoint_dir(dest_run_dir), str(step)))
  return step


def training_minutes(workdir: str, config: ml_collections.ConfigDict) -> float | None:
  """Training time from the logged throughput (metrics.jsonl): Σ slices logged / slices/s."""
  seconds, last = 0.0, 0
  for rec in metric_writer.read_metrics(workdir):
    if rec.get("slices_per_sec"):
      seconds += (rec["step"] - last) * int(config.train.batch_size) / rec["slices_per_sec"]
      last = rec["step"]
  return seconds / 60 if last else None


def _card(config: ml_collections.ConfigDict, workdir: str, step: int, kinds: list[str],
          metrics: dict[str, Any] | None) -> str:
  d, m, t = config.data, config.model, config.train
  g = int(d.grid)
  synthetic = d.source == "synthetic"
  minutes = training_minutes(workdir, config)
  data = (f"{int(d.synth.num_subjects)} synthetic subjects of the embedded default data set "
          f"({int(d.num_val)} held out)" if synthetic else
          f"NIfTI volumes from `{d.root}` (layout `{d.layout}`, {int(d.num_val)} held out)")
  lines = [
      f"# {config.name}: slice VAE model bundle", "",
      f"Exported {datetime.date.today()} with slicevae_jax {__version__} from `{workdir}`. "
      f"A 2D slice VAE and a Gaussian over the slice direction (Volokitin et al., MICCAI 2020).",
      "", "## Use", "", "```python", "import jax",
      "from slicevae_jax import load_for_inference, sample_volumes",
      "bundle = load_for_inference('THIS_FOLDER')",
      "volumes = sample_volumes(bundle, jax.random.key(0), num=4)   # [4, X, Y, Z] in [0, 1]",
      "```", "",
      "or `slicevae --config=THIS_FOLDER/config.py --workdir=THIS_FOLDER --mode=sample` "
      "(samples go to THIS_FOLDER/samples/).", "",
      "## Data and grid", "",
      f"- Data: {data}.",
      f"- Grid: {g}³ voxels of {float(d.voxel_size):g} mm, RAS; slices along axis "
      f"{int(d.slice_axis)}; intensities scaled to [0, 1] between the percentiles "
      f"{d.percentiles[0]:g} and {d.percentiles[1]:g} (N4 bias correction: "
      f"{'yes' if d.n4 else 'no'}). A new scan must go through the same recipe "
      f"(`{workdir_lib.RECIPE_FILE}`).", "",
      "## Model and training", "",
      f"- Slice VAE, base width {int(m.base_width)}, latent "
      f"{int(m.latent_size)}×{int(m.latent_size)}×{int(m.latent_channels)} per slice.",
      f"- {step} steps of batch {int(t.batch_size)} slices, Adam, learning rate "
      f"{float(t.learning_rate):g} ({t.lr_schedule}), KL weight {float(t.kl_weight):g}"
      + (f"; about {minutes:.0f} min of training." if minutes else "."),
      f"- Latent models: {', '.join(kinds)} (the first is the default of sampling), rank "
      f"{int(config.latent.rank)} on {int(config.latent.num_volumes)} training volumes.", "",
      "## Evaluation", ""]
  if metrics:
    rows = metrics.get("rows") or [metrics["model"]]
    lines += [report_lib.table_markdown(rows, metrics.get("real")), ""]
  else:
    lines += ["No evaluation in the source workdir (`--mode=evaluate` writes one).", ""]
  lines += [
      "## Intended use and limits", "",
      "Research on generative models of brain MRI: sampling volumes, studying the latent "
      "model, comparing with other generators. Not for clinical use. The model knows only the "
      "population and acquisition it was trained on; at this grid, small structures are a "
      "few voxels wide. Log densities of the latent model are densities of latent codes, "
      "comparable only between volumes scored by this bundle.", ""]
  if synthetic:
    lines += ["## Data notice", "", _TEMPLATE_NOTICE, ""]
  return "\n".join(lines)


def export(workdir: str, out: str) -> str:
  """Writes the bundle of trained slice VAE `workdir` to the new folder `out`; returns `out`.

  Raises:
    ConfigError: the workdir is a 3D baseline's (not exported) or `out` exists.
    DataError: the workdir has no checkpoint or no fitted latent model.
  """
  workdir, out = os.path.abspath(workdir), os.path.abspath(out)
  config = workdir_lib.load_config(workdir)
  if config.model_type != "slice_vae":
    raise ConfigError(f"{workdir}: model_type {config.model_type!r}; export writes slice VAE "
                      f"bundles (a 3D baseline's workdir is read with load_baseline)")
  if os.path.exists(out):
    raise ConfigError(f"{out}: already exists; export writes a new folder (choose another "
                      f"--out or remove it)")
  main_latent = workdir_lib.latent_file(workdir)
  if not os.path.exists(main_latent):
    raise DataError(f"{main_latent}: missing; run --mode=fit_latent before exporting")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
  try:
    step = _copy_newest_checkpoint(workdir, tmp)
    shutil.copy2(os.path.join(workdir, workdir_lib.CONFIG_FILE), tmp)
    fileio.write_text(os.path.join(tmp, "config.py"), _CONFIG_PY)
    cache_path = workdir_lib.cache_dir(config, workdir)
    cache = VolumeCache(cache_path) if VolumeCache.exists(cache_path) else None
    fileio.write_json(workdir_lib.recipe_file(tmp),
                      density_stages.load_recipe(workdir, config, cache))
    if cache is not None and cache.split("val"):
      # What --mode=score ranks new scans against, computed now: the bundle has no data.
      model = inference.load_for_inference(workdir)
      ref = density.reference_scores(
          model, np.stack([cache.volume(i) for i in cache.split("val")]),
          density_stages.latent_models(workdir, model, ""))
      density_stages.save_reference(workdir_lib.score_reference(tmp), ref)
    kinds = [str(config.latent.model)]
    shutil.copy2(main_latent, tmp)
    for name in sorted(os.listdir(workdir)):
      if (name.startswith("latent_") and name.endswith(".npz")
          and name != workdir_lib.LATENT_FILE):
        shutil.copy2(os.path.join(workdir, name), tmp)
        kinds.append(name[len("latent_"):-len(".npz")])
    seg = workdir_lib.segmenter_dir(workdir)
    seg_step = None
    if workdir_lib.latest_step(seg) is not None:
      seg_step = _copy_newest_checkpoint(seg, workdir_lib.segmenter_dir(tmp))
    metrics = None
    eval_dir = workdir_lib.eval_dir(workdir)
    if os.path.exists(os.path.join(eval_dir, workdir_lib.METRICS_FILE)):
      os.makedirs(workdir_lib.eval_dir(tmp))
      for name in (workdir_lib.METRICS_FILE, workdir_lib.REPORT_FILE):
        if os.path.exists(os.path.join(eval_dir, name)):
          shutil.copy2(os.path.join(eval_dir, name), workdir_lib.eval_dir(tmp))
      metrics = fileio.read_json(os.path.join(eval_dir, workdir_lib.METRICS_FILE))
    fileio.write_text(os.path.join(tmp, CARD_FILE), _card(config, workdir, step, kinds, metrics))
    files = {}
    for root, _, names in os.walk(tmp):
      for name in sorted(names):
        path = os.path.join(root, name)
        files[os.path.relpath(path, tmp)] = staleness.file_sha256(path)
    fileio.write_json(os.path.join(tmp, BUNDLE_FILE), {
        "format_version": FORMAT_VERSION, "slicevae_jax": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_workdir": workdir, "name": str(config.name), "checkpoint_step": step,
        "segmenter_step": seg_step, "latent_models": kinds,
        "label_names": (cache.manifest.get("label_names") if cache is not None else None),
        "files": dict(sorted(files.items()))})
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def verify(path: str) -> dict[str, Any]:
  """The bundle's record, after checking every listed file's SHA-256 (DataError naming it)."""
  index = fileio.read_json(os.path.join(path, BUNDLE_FILE))
  if int(index.get("format_version", 0)) > FORMAT_VERSION:
    raise DataError(f"{path}: bundle format {index['format_version']} is newer than this "
                    f"slicevae_jax reads ({FORMAT_VERSION}); upgrade slicevae_jax")
  for rel, digest in index["files"].items():
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
      raise DataError(f"{full}: missing from the bundle")
    if staleness.file_sha256(full) != digest:
      raise DataError(f"{full}: content differs from the bundle's record (changed or corrupt)")
  return index
