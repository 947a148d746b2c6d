"""Sampling stage: latent Gaussian -> decoded volumes -> NIfTI files and PNG pictures.

Writes `<workdir>/samples/sample_XXXX.nii.gz` (RAS, the cache's grid affine and
voxel size) and `sample_XXXX.png` (three orthogonal mid-slices), then
`samples.json` last: its presence means the set is complete. It records what the
set was made from (checkpoint step, count, seed and, for the slice VAE, BN mode
and the latent file's SHA-256); `--mode=all` resamples when any of them changed.
"""

import os
from typing import Any, Callable

import jax
import numpy as np
import ml_collections
from absl import logging

from slicevae_jax import fileio
from slicevae_jax import inference
from slicevae_jax import staleness
from slicevae_jax import viz
from slicevae_jax.data import nifti

SAMPLES_DIR = "samples"
INDEX = "samples.json"


def sample_inputs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What slice VAE samples depend on beyond step, count and seed, for `samples.json`.

  The latent model drawn from, the latent file's SHA-256 (any refit, whatever
  changed, makes new samples) and the BN mode decoding uses; {} for the 3D baselines, which have neither.
  """
  if config.model_type != "slice_vae":
    return {}
  return {"latent_model": str(config.latent.model), "bn_mode": str(config.model.bn_mode),
          "latent_sha256": staleness.file_sha256(os.path.join(workdir, inference.LATENT_FILE))}


def is_current(workdir: str, config: ml_collections.ConfigDict, step: int) -> bool:
  """True if `samples.json` records this step, count, seed and `sample_inputs`.

  Logs (INFO) what changed when it does not.
  """
  path = os.path.join(workdir, SAMPLES_DIR, INDEX)
  if not os.path.exists(path):
    return False
  wanted = dict(checkpoint_step=step, num_volumes=int(config.sample.num_volumes),
                seed=int(config.sample.seed), **sample_inputs(config, workdir))
  return not staleness.stale(path, fileio.read_json(path), wanted)


def write_sample_set(config: ml_collections.ConfigDict, out_dir: str,
                     sample_fn: Callable[[int, int], np.ndarray], affine: np.ndarray,
                     index: dict[str, Any]) -> list[str]:
  """Writes sample.num_volumes volumes from `sample_fn(start, num) -> [num, X, Y, Z]`.

  Every process calls `sample_fn` (it may be a collective); process 0 writes the
  NIfTI files, PNGs and, last, `samples.json` (`index` plus num_volumes, seed, files).
  """
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
    fileio.write_json(os.path.join(out_dir, INDEX), dict(
        index, num_volumes=num, seed=int(config.sample.seed),
        files=[os.path.basename(p) for p in paths], affine=np.asarray(affine).tolist()))
  logging.info("wrote %d samples to %s", len(paths), out_dir)
  return paths


def write_samples(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> list[str]:
  """Samples `sample.num_volumes` volumes and writes them; returns the NIfTI paths."""
  bundle = inference.load_for_inference(workdir, mesh=mesh)
  key = jax.random.key(int(config.sample.seed))
  return write_sample_set(
      config, os.path.join(workdir, SAMPLES_DIR),
      lambda start, num: inference.sample_volumes(bundle, key, num, start=start),
      bundle.affine, {"checkpoint_step": bundle.step, "slice_axis": bundle.slice_axis,
                      **sample_inputs(bundle.config, workdir)})
