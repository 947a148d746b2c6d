"""Modes score, complete and interpolate of `main`: NIfTI files in, NIfTI/CSV/JSON/PNG out.

Wraps the array functions of `density` for files: reads each input (`--inputs`, files or
folders), brings it to the model grid with the workdir's preprocessing recipe
(<workdir>/preprocess.json, written when the cache is prepared), runs the tool and writes
its outputs into one folder (default <workdir>/<mode>/). Every input is read and checked
before anything is written, every file is written atomically and the mode's JSON index
last, so a refused input leaves no partial output.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from slicevae_jax import fileio
from slicevae_jax import rng
from slicevae_jax import viz
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data import nifti
from slicevae_jax.data import preprocess
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError, DataError
from slicevae_jax.slicevae import density
from slicevae_jax.slicevae import fit_latent as fit_latent_lib
from slicevae_jax.slicevae import inference
from slicevae_jax.slicevae import latent as lg

MODES = ("score", "complete", "interpolate")
INDEX = {"score": "scores.json", "complete": "completion.json",
         "interpolate": "interpolation.json"}
# Below this percentile of the held-out real volumes a score reads as atypical.
ATYPICAL_PERCENTILE = 5.0
# A volume counts as already preprocessed when its values lie in [0, 1] within this.
RANGE_TOLERANCE = 1e-3
DENSITY_NOTE = ("log_density is the log density (nats) of the volume's posterior-mean latent "
                "codes under the workdir's latent model, not a density of the image; compare it "
                "only with other volumes scored by the same workdir and model.")


@dataclasses.dataclass
class Options:
  """The command-line choices of the density modes (main.py reads the flags)."""
  inputs: str = ""
  out: str = ""
  latent_model: str = ""
  keep_every: int = 0
  missing: str = ""
  num_samples: int = 8
  steps: int = 8


# ----------------------------------------------------------------------------- recipe


def recipe(config: ml_collections.ConfigDict, cache: VolumeCache) -> dict[str, Any]:
  """How a new scan reaches the model grid: the cache's preprocessing settings and grid."""
  d = config.data
  # pylint: disable-next=protected-access
  out = dict(preprocess.settings(d))
  out.update(source=str(d.source), grid=int(cache.grid[0]), slice_axis=int(cache.slice_axis),
             voxel_size=float(cache.voxel_size[0]))
  return out


def write_recipe(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache) -> None:
  """Stores `recipe` as <workdir>/preprocess.json (unchanged files are not rewritten)."""
  path = workdir_lib.recipe_file(workdir)
  want = recipe(config, cache)
  if not os.path.exists(path) or fileio.read_json(path) != want:
    fileio.write_json(path, want)


def load_recipe(workdir: str, config: ml_collections.ConfigDict,
                cache: VolumeCache | None) -> dict[str, Any]:
  """<workdir>/preprocess.json, or the recipe of the workdir's config for older workdirs."""
  path = workdir_lib.recipe_file(workdir)
  if os.path.exists(path):
    return fileio.read_json(path)
  if cache is None:
    raise DataError(f"{path}: missing; a model bundle carries its preprocessing recipe")
  logging.info("%s missing (a workdir from before it was stored); using the workdir's config",
               path)
  return recipe(config, cache)


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Input:
  """One input scan on the model grid: where it came from and how it got there."""
  path: str
  name: str
  volume: np.ndarray        # [X, Y, Z] in [0, 1] on the model grid
  affine: np.ndarray        # its grid affine (voxel -> the input's world mm)
  how: str                  # 'as given (already on the model grid)' | 'preprocessed'


def list_inputs(spec: str) -> list[str]:
  """NIfTI paths of a comma-separated list of files and folders (folders: sorted contents)."""
  parts = [p.strip() for p in (spec or "").split(",") if p.strip()]
  if not parts:
    raise ConfigError("--inputs: give NIfTI files or folders, comma-separated")
  paths = []
  for p in parts:
    if os.path.isdir(p):
      found = sorted(f for f in os.listdir(p) if f.endswith(nifti.NIFTI_SUFFIXES))
      if not found:
        raise DataError(f"{p}: no .nii / .nii.gz files in this folder")
      paths += [os.path.join(p, f) for f in found]
    elif os.path.exists(p):
      paths.append(p)
    else:
      raise DataError(f"{p}: input file or folder does not exist")
  return paths


def _stem(path: str) -> str:
  base = os.path.basename(path)
  for suffix in nifti.NIFTI_SUFFIXES:
    if base.endswith(suffix):
      return base[:-len(suffix)]
  return base


def on_grid(data: np.ndarray, affine: np.ndarray, r: dict[str, Any]) -> bool:
  """Whether a volume already is a preprocessed one: the grid, the voxel size, values in [0, 1].

  Such volumes (the cache's, the sample stage's NIfTI files, a synthetic workdir's data)
  are used as they are; percentile scaling again would change them.
  """
  return (data.shape == (r["grid"],) * 3
          and np.allclose(nifti.voxel_sizes(affine), r["voxel_size"], rtol=1e-3)
          and float(data.min()) >= -RANGE_TOLERANCE
          and float(data.max()) <= 1.0 + RANGE_TOLERANCE)


def read_input(path: str, r: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, str]:
  """One NIfTI file on the model grid: (volume, grid affine, how); DataError naming the file."""
  data, affine = nifti.load_volume(path)
  try:
    if on_grid(data, affine, r):
      preprocess.check_extent(data, affine, r["grid"], r["voxel_size"])
      return np.clip(data, 0.0, 1.0), affine, "as given (already on the model grid)"
    image, _, grid_affine = preprocess.preprocess_volume(
        data, affine, grid=r["grid"], voxel_size=r["voxel_size"], n4=r["n4"],
        percentiles=r["percentiles"], foreground_percentiles=r["foreground_percentiles"],
        antialias=r["antialias"])
    return image, grid_affine, "preprocessed"
  except DataError as e:
    raise DataError(f"{path}: {e}") from e


def read_inputs(spec: str, r: dict[str, Any]) -> list[Input]:
  """Every input of `spec` on the model grid, all read before anything is written."""
  out, seen = [], {}
  for path in list_inputs(spec):
    volume, affine, how = read_input(path, r)
    stem = _stem(path)
    seen[stem] = seen.get(stem, 0) + 1
    name = stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"
    out.append(Input(path=path, name=name, volume=volume, affine=affine, how=how))
    logging.info("%s: %s", path, how)
  return out


def latent_models(workdir: str, bundle: inference.InferenceBundle, wanted: str
            ) -> dict[str, lg.LatentGaussian]:
  """{kind: model} of the workdir (all of them, or the one `wanted` names)."""
  files = fit_latent_lib.latent_files(workdir)
  if wanted and wanted not in files:
    raise ConfigError(f"--latent_model={wanted!r}: {workdir} has latent models "
                      f"{sorted(files)}; fit others with eval.latent_models")
  return {k: (bundle.gaussian if p.endswith(workdir_lib.LATENT_FILE) else lg.load(p)[0])
          for k, p in files.items() if not wanted or k == wanted}


def _one_model(workdir: str, bundle: inference.InferenceBundle, wanted: str
               ) -> tuple[str, lg.LatentGaussian]:
  if not wanted:
    return bundle.gaussian.kind, bundle.gaussian
  return next(iter(latent_models(workdir, bundle, wanted).items()))


# ----------------------------------------------------------------------------- writing


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  w.writerows(rows)
  return buf.getvalue()


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save_figure(fig: Any, path: str) -> None:
  with fileio.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
  _pyplot().close(fig)


def _planes(volume: np.ndarray) -> np.ndarray:
  """`viz.three_planes`, enlarged by whole voxels so a small grid is >= 128 pixels high."""
  img = viz.three_planes(volume)
  k = max(1, -(-128 // img.shape[0]))
  return np.repeat(np.repeat(img, k, axis=0), k, axis=1)


def strip(volumes: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """Three mid-planes of each volume side by side, one volume per row (uint8)."""
  rows = [_planes(v) for v in volumes]
  gap = np.zeros((pad, rows[0].shape[1]), np.uint8)
  return np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)


def reading(density_pct: float, recon_pct: float) -> str:
  """A one-line reading of a volume's two percentiles (see README, Density tools)."""
  if recon_pct < ATYPICAL_PERCENTILE:
    return ("reconstructs worse than the held-out scans: probably not a scan like the "
            "training data (not a brain, other contrast, artefact, other preprocessing)")
  if density_pct < ATYPICAL_PERCENTILE:
    return ("atypical latent codes, but reconstructs like the held-out scans: an unusual "
            "brain (or one the latent model has not seen the like of)")
  return "typical of the held-out real scans"


# ----------------------------------------------------------------------------- score


def _slice_plot(path: str, name: str, scores: density.Scores, i: int) -> None:
  plt = _pyplot()
  kinds = list(scores.slice_log_density)
  fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.2), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    ref = scores.reference["slice_log_density"][kind]
    s = np.arange(ref.shape[1])
    ax.fill_between(s, ref.min(0), ref.max(0), color="0.8", label="held-out range")
    ax.plot(s, np.median(ref, 0), color="0.4", lw=1, label="held-out median")
    ax.plot(s, scores.slice_log_density[kind][i], color="C3", lw=1.5, label=name)
    ax.set_xlabel("slice")
    ax.set_ylabel("log p(slice codes | other slices)")
    ax.set_title(f"{kind} latent model")
    ax.legend(fontsize=7)
  _save_figure(fig, path)


def save_reference(path: str, ref: dict[str, Any]) -> None:
  """`density.reference_scores` as one .npz (a bundle's score_reference.npz)."""
  arrays = {"recon_mse": ref["recon_mse"]}
  for field in ("log_density", "slice_log_density"):
    arrays.update({f"{field}.{k}": v for k, v in ref[field].items()})
  fileio.save_npz(path, **arrays)


def load_reference(path: str) -> dict[str, Any]:
  with np.load(path) as z:
    ref: dict[str, Any] = {"recon_mse": z["recon_mse"], "log_density": {},
                           "slice_log_density": {}}
    for name in z.files:
      field, _, kind = name.partition(".")
      if kind:
        ref[field][kind] = z[name]
  return ref


def heldout_reference(workdir: str, bundle: inference.InferenceBundle,
                      cache: VolumeCache | None) -> tuple[dict[str, Any] | np.ndarray, str, int]:
  """(reference, where it comes from, how many volumes): the cache's held-out volumes of a
  workdir, or the scores of them a bundle stores."""
  if cache is None:
    path = workdir_lib.score_reference(workdir)
    if not os.path.exists(path):
      raise DataError(f"{path}: missing; this bundle was exported without held-out scores")
    ref = load_reference(path)
    return ref, path, len(ref["recon_mse"])
  val = cache.split("val")
  if not val:
    raise DataError(f"{cache.path}: no held-out ('val') volumes to score against; set "
                    f"data.num_val > 0")
  return np.stack([cache.volume(i) for i in val]), cache.path, len(val)


def run_score(workdir: str, bundle: inference.InferenceBundle, cache: VolumeCache | None,
              inputs: list[Input], opts: Options, out: str) -> dict[str, Any]:
  """Scores every input against the held-out volumes; writes CSV, plots, JSON."""
  models = latent_models(workdir, bundle, opts.latent_model)
  reference, source, num_ref = heldout_reference(workdir, bundle, cache)
  scores = density.score_volumes(bundle, np.stack([x.volume for x in inputs]), reference, models)
  rows, records = [], []
  for i, x in enumerate(inputs):
    rec = {"file": x.path, "name": x.name, "input": x.how, "recon_mse": float(scores.recon_mse[i]),
           "recon_percentile": float(scores.recon_percentile[i]), "models": {}}
    for kind in models:
      ld, pct = scores.log_density[kind][i], scores.log_density_percentile[kind][i]
      rec["models"][kind] = {"log_density": float(ld), "log_density_percentile": float(pct),
                             "reading": reading(pct, rec["recon_percentile"])}
      rows.append([x.path, kind, f"{ld:.6g}", f"{pct:.1f}", f"{rec['recon_mse']:.6g}",
                   f"{rec['recon_percentile']:.1f}", rec["models"][kind]["reading"]])
    records.append(rec)
  os.makedirs(out, exist_ok=True)
  for i, x in enumerate(inputs):
    header = ["slice"] + [f"{k}_log_p_given_rest" for k in models] + \
             [f"{k}_heldout_median" for k in models]
    table = [[s] + [f"{scores.slice_log_density[k][i, s]:.6g}" for k in models]
             + [f"{np.median(scores.reference['slice_log_density'][k][:, s]):.6g}"
                for k in models]
             for s in range(bundle.gaussian.num_slices)]
    fileio.write_text(os.path.join(out, f"{x.name}_slices.csv"), _csv_text(header, table))
    _slice_plot(os.path.join(out, f"{x.name}_slices.png"), x.name, scores, i)
    viz.save_png(os.path.join(out, f"{x.name}_recon.png"),
                 strip([x.volume, scores.reconstructions[i]]))
  fileio.write_text(os.path.join(out, "scores.csv"), _csv_text(
      ["file", "latent_model", "log_density", "log_density_percentile", "recon_mse",
       "recon_percentile", "reading"], rows))
  ref = scores.reference
  index = {
      "note": DENSITY_NOTE,
      "percentiles": ("share (%) of the held-out real volumes that are at most as typical: "
                      "a lower log density, or a larger reconstruction error; 0 = below "
                      "every held-out volume"),
      "reference": {"source": source, "num_volumes": num_ref,
                    "log_density": {k: _summary(v) for k, v in ref["log_density"].items()},
                    "recon_mse": _summary(ref["recon_mse"])},
      "checkpoint_step": bundle.step, "volumes": records}
  fileio.write_json(os.path.join(out, INDEX["score"]), index)
  return index


def _summary(x: np.ndarray) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  return {"min": float(x.min()), "median": float(np.median(x)), "max": float(x.max())}


# ----------------------------------------------------------------------------- complete


def observed_mask(opts: Options, num_slices: int) -> np.ndarray:
  """The observed slices of --keep_every=k (slices 0, k, 2k, ...) or --missing=a:b,c."""
  if bool(opts.keep_every) == bool(opts.missing):
    raise ConfigError("--mode=complete: give exactly one of --keep_every=K (a thick-slice "
                      "scan: every K-th slice acquired) and --missing=SLICES (e.g. 20:30,41)")
  if opts.keep_every:
    if opts.keep_every < 2 or opts.keep_every >= num_slices:
      raise ConfigError(f"--keep_every={opts.keep_every}: need 2 <= K < {num_slices}")
    return density.keep_every(num_slices, int(opts.keep_every))
  missing = density.parse_slices(opts.missing, num_slices)
  if missing.all():
    raise ConfigError(f"--missing={opts.missing}: every slice is missing")
  return ~missing


def run_complete(workdir: str, bundle: inference.InferenceBundle, inputs: list[Input],
                 opts: Options, out: str, key: jax.Array) -> dict[str, Any]:
  """Completes every input's missing slices; writes completed and std NIfTIs, PNG, JSON."""
  kind, g = _one_model(workdir, bundle, opts.latent_model)
  observed = observed_mask(opts, g.num_slices)
  if opts.num_samples < 0:
    raise ConfigError(f"--num_samples={opts.num_samples}: need >= 0")
  results = [density.complete_volume(bundle, x.volume, observed, jax.random.fold_in(key, i),
                                     int(opts.num_samples), g)
             for i, x in enumerate(inputs)]
  os.makedirs(out, exist_ok=True)
  records = []
  gap = ~observed
  for x, c in zip(inputs, results):
    files = {"completed": f"{x.name}_completed.nii.gz", "std": f"{x.name}_std.nii.gz",
             "png": f"{x.name}_completion.png"}
    nifti.save_volume(os.path.join(out, files["completed"]), c.mean, x.affine)
    nifti.save_volume(os.path.join(out, files["std"]), c.std, x.affine)
    shown = np.moveaxis(np.moveaxis(x.volume, bundle.slice_axis, 0) * observed[:, None, None],
                        0, bundle.slice_axis)
    std_shown = c.std / max(float(c.std.max()), 1e-6)
    panels = [shown, c.mean] + list(c.samples[:1]) + [std_shown]
    viz.save_png(os.path.join(out, files["png"]), strip(panels))
    # Error on the missing slices against whatever the input holds there: meaningful only
    # when those slices were acquired and dropped on purpose (a validation run).
    diff = np.moveaxis(c.mean - x.volume, bundle.slice_axis, 0)[gap]
    mse = float(np.mean(np.square(diff)))
    records.append({"file": x.path, "input": x.how, "files": files,
                    "missing_slices_mse_vs_input": mse,
                    "missing_slices_psnr_vs_input": float(10 * np.log10(1 / max(mse, 1e-12)))})
  index = {"latent_model": kind, "slice_axis": bundle.slice_axis,
           "observed_slices": np.flatnonzero(observed).tolist(),
           "num_samples": int(opts.num_samples), "checkpoint_step": bundle.step,
           "png_rows": ["input (missing slices black)", "conditional mean", "one sample",
                        "per-voxel std over the samples (scaled to its max)"],
           "note": ("observed slices are the input's own; missing_slices_*_vs_input compare "
                    "the completion with what the input holds at the missing slices, "
                    "meaningful only when those were acquired and removed on purpose"),
           "volumes": records}
  fileio.write_json(os.path.join(out, INDEX["complete"]), index)
  return index


# ----------------------------------------------------------------------------- interpolate


def run_interpolate(workdir: str, bundle: inference.InferenceBundle, inputs: list[Input],
                    opts: Options, out: str) -> dict[str, Any]:
  """Decodes a straight factor-space path between two inputs; NIfTI per step, PNG, JSON."""
  kind, g = _one_model(workdir, bundle, opts.latent_model)
  a, b = inputs
  path = density.interpolate_volumes(bundle, a.volume, b.volume, int(opts.steps), g)
  plain = density.decode_stacks(bundle, density.encode_volumes(bundle, np.stack([a.volume,
                                                                                b.volume])))
  os.makedirs(out, exist_ok=True)
  names = []
  for j, vol in enumerate(path.volumes):
    names.append(f"step_{j:02d}.nii.gz")
    nifti.save_volume(os.path.join(out, names[-1]), vol, a.affine)
  viz.save_png(os.path.join(out, "interpolation.png"),
               strip([a.volume] + list(path.volumes) + [b.volume]))
  mse = lambda u, v: float(np.mean(np.square(u.astype(np.float64) - v)))
  index = {"latent_model": kind, "inputs": [a.path, b.path], "t": path.t.tolist(),
           "files": names, "log_density": path.log_density.tolist(),
           "residual_fraction": path.residual_fraction.tolist(),
           "endpoint_mse": [mse(path.volumes[0], a.volume), mse(path.volumes[-1], b.volume)],
           "plain_encode_decode_mse": [mse(plain[0], a.volume), mse(plain[1], b.volume)],
           "png": "interpolation.png: rows top to bottom are the first input, the steps, the "
                  "second input (sagittal, coronal, axial mid-slices)",
           "note": DENSITY_NOTE + " residual_fraction: the share of each input's codes outside "
                   "the model's subspace, carried linearly along the path.",
           "checkpoint_step": bundle.step}
  fileio.write_json(os.path.join(out, INDEX["interpolate"]), index)
  return index


# ----------------------------------------------------------------------------- entry


def run_workdir(workdir: str, mode: str, opts: Options, mesh=None) -> dict[str, Any]:
  """`run` on a trained workdir, with its stored config and its cache (the held-out volumes
  the scores are ranked against), or on a model bundle (the scores of them it stores)."""
  if workdir_lib.is_bundle(workdir):
    return run(workdir, mode, opts, None, mesh)
  stored = workdir_lib.load_config(workdir)
  path = workdir_lib.cache_dir(stored, workdir)
  if not VolumeCache.exists(path):
    raise DataError(f"{path}: no cache; --mode={mode} ranks against the workdir's held-out "
                    f"volumes and needs a trained workdir")
  return run(workdir, mode, opts, VolumeCache(path), mesh)


def run(workdir: str, mode: str, opts: Options, cache: VolumeCache | None,
        mesh=None) -> dict[str, Any]:
  """Runs density mode `mode` on a trained workdir (its stored config) and writes its outputs."""
  if mode not in MODES:
    raise ConfigError(f"unknown density mode {mode!r}; choose one of {list(MODES)}")
  # Inputs and options are checked before the model is loaded: a refusal comes at once.
  config = workdir_lib.load_config(workdir)
  inputs = read_inputs(opts.inputs, load_recipe(workdir, config, cache))
  if mode == "interpolate" and len(inputs) != 2:
    raise DataError(f"--mode=interpolate takes exactly 2 volumes, --inputs gave {len(inputs)}: "
                    f"{[x.path for x in inputs]}")
  if mode == "complete":
    observed_mask(opts, int(config.data.grid))
  out = opts.out or os.path.join(workdir, mode)
  if os.path.exists(out) and not os.path.isdir(out):
    raise DataError(f"{out}: the output folder is a file; choose another --out")
  bundle = inference.load_for_inference(workdir, mesh=mesh)
  if mode == "score":
    index = run_score(workdir, bundle, cache, inputs, opts, out)
  elif mode == "complete":
    index = run_complete(workdir, bundle, inputs, opts, out,
                         rng.key(int(bundle.config.seed), "complete"))
  else:
    index = run_interpolate(workdir, bundle, inputs, opts, out)
  logging.info("%s: %d input(s) -> %s", mode, len(inputs), os.path.join(out, INDEX[mode]))
  return index
