"""Latent stage: cache + checkpoint -> encoded training stacks -> the fitted latent Gaussians.

Reads the cache and the newest checkpoint, writes `<workdir>/latent_gaussian.npz` for the
config's `latent.model` (per_dim: the paper's per-dimension slice Gaussians, §2.1; joint;
rotated) with the metadata sampling needs (mean, factors, singular values, slice axis,
grid, voxel size, affine, checkpoint step), so sampling never re-encodes volumes, and
`latent_<kind>.npz` for each other model the evaluation compares (`eval.latent_models`),
fitted on the same codes. The meta also records what the fit depends on (`fit_inputs`:
checkpoint step, requested rank and count, latent model, BN mode, seed); `--mode=all`
refits when any of them changed.
"""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from slicevae_jax import parallel
from slicevae_jax import rng
from slicevae_jax import staleness
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.slicevae import inference
from slicevae_jax.slicevae import latent as lg


def latent_meta(config, cache: VolumeCache, step: int, subjects: list[int],
                g: lg.LatentGaussian) -> dict:
  return {
      "checkpoint_step": int(step),
      "slice_axis": int(cache.slice_axis),
      "grid": list(cache.grid),
      "affine": cache.reference_affine(subjects).tolist(),
      "voxel_size": list(cache.voxel_size),
      "latent_shape": [int(config.model.latent_size)] * 2 + [int(config.model.latent_channels)],
      "bn_mode": config.model.bn_mode,
      "num_volumes": len(subjects),
      "subjects": [cache.subjects[i]["id"] for i in subjects],
      "model": g.kind,
      "rank": g.rank,
      "explained_variance": float(np.mean(np.asarray(lg.explained_variance(g)))),
  }


def fit_inputs(config: ml_collections.ConfigDict, step: int, model: str | None = None) -> dict:
  """What a fit depends on besides the cache (which `pipeline` checks): its meta['fit_inputs'].

  The requested rank and count, not the ones a small set allows, so an unchanged
  config stays current. `model` defaults to latent.model (the main file's).
  """
  return {
      "checkpoint_step": int(step),
      "rank_requested": int(config.latent.rank),
      "num_volumes_requested": int(config.latent.num_volumes),
      "model": str(model or config.latent.model),
      "bn_mode": str(config.model.bn_mode),   # encoding at inference depends on it
      "seed": int(config.seed),               # which training volumes are encoded
  }


def extra_models(config: ml_collections.ConfigDict) -> list[str]:
  """Latent models fitted beside latent.model for the report's rows (eval.latent_models)."""
  if not config.eval.reconstructions and not config.eval.latent_models:
    return []
  return [k for k in dict.fromkeys(config.eval.latent_models) if k != config.latent.model]


def latent_files(workdir: str) -> dict[str, str]:
  """{model kind: path} of every latent model file in the workdir, the main one first."""
  out = {}
  main = workdir_lib.latent_file(workdir)
  if os.path.exists(main):
    try:
      _, meta = lg.load(main)
      out[meta.get("model", "per_dim")] = main
    except Exception:  # pylint: disable=broad-except
      pass
  for kind in lg.MODELS:
    path = workdir_lib.latent_file(workdir, kind)
    if kind not in out and os.path.exists(path):
      out[kind] = path
  return out


def _file_current(path: str, wanted: dict) -> bool:
  if not os.path.exists(path):
    return False
  try:
    _, meta = lg.load(path)
  except Exception:  # pylint: disable=broad-except
    return False
  return not staleness.stale(path, meta.get("fit_inputs", {}), wanted)


def is_current(workdir: str, config: ml_collections.ConfigDict, step: int) -> bool:
  """True if the latent file(s) exist and were fitted with `fit_inputs(config, step)`.

  The main file (latent.model) and one file per other model of eval.latent_models.
  Logs (INFO) what changed when one was not; a file without the record is stale.
  """
  if not _file_current(workdir_lib.latent_file(workdir), fit_inputs(config, step)):
    return False
  return all(_file_current(workdir_lib.latent_file(workdir, k), fit_inputs(config, step, k))
             for k in extra_models(config))


def fit_latent(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
               mesh=None) -> lg.LatentGaussian:
  """Encodes `latent.num_volumes` training volumes and fits, saves the latent Gaussian."""
  mesh = mesh or parallel.make_mesh()
  bundle = inference.load_for_inference(workdir, mesh=mesh, require_latent=False)
  train_ids = cache.split("train")
  n = min(int(config.latent.num_volumes), len(train_ids))
  choose = rng.generator(config.seed, "latent_subjects")
  subjects = sorted(choose.choice(train_ids, size=n, replace=False).tolist())
  if n < config.latent.num_volumes:
    logging.warning("latent fit: only %d training volumes (asked for %d)", n,
                    config.latent.num_volumes)
  t0 = time.perf_counter()
  # Encode in chunks read from the memory map, so N volumes never sit in RAM at once.
  chunk = max(int(config.latent.encode_batch), 1) * 4
  ys = []
  for start in range(0, n, chunk):
    stacks = np.stack([cache.stack(i) for i in subjects[start:start + chunk]])
    ys.append(inference.encode_stacks(bundle, stacks, config.latent.encode_batch))
  y = np.concatenate(ys)                                          # [N, S, L]
  encode_seconds = time.perf_counter() - t0
  # The main model, then the others the report compares on the same codes.
  main = None
  for kind in [config.latent.model] + extra_models(config):
    t1 = time.perf_counter()
    g = lg.fit(y, int(config.latent.rank), model=kind)
    jax.block_until_ready(g.W)
    t2 = time.perf_counter()
    meta = latent_meta(config, cache, bundle.step, subjects, g)
    meta.update(encode_seconds=encode_seconds, fit_seconds=t2 - t1)
    meta["fit_inputs"] = fit_inputs(config, bundle.step, kind)
    path = (workdir_lib.latent_file(workdir) if main is None
            else workdir_lib.latent_file(workdir, kind))
    if jax.process_index() == 0:
      lg.save(path, g, meta)
    logging.info("latent model %s: N=%d, S=%d, L=%d, rank %d, %.1f%% variance kept; fit %.1fs "
                 "-> %s", kind, n, y.shape[1], y.shape[2], meta["rank"],
                 100 * meta["explained_variance"], t2 - t1, os.path.basename(path))
    main = g if main is None else main
  logging.info("latent fit: %d volumes encoded in %.1fs", n, encode_seconds)
  return main
