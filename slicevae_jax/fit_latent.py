"""Latent stage: encode N training volumes slice by slice, fit the per-dimension Gaussian.

Reads the cache and the newest checkpoint, writes `<workdir>/latent_gaussian.npz`
(mean, W, singular values and the metadata sampling needs: slice axis, grid,
voxel size, affine, checkpoint step), so sampling never re-encodes volumes.
"""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from slicevae_jax import inference
from slicevae_jax import latent_gaussian as lg
from slicevae_jax import parallel
from slicevae_jax.data.cache import VolumeCache


def reference_affine(cache: VolumeCache, subjects: list[int]) -> np.ndarray:
  """A grid affine for generated volumes: shared rotation/zooms, mean translation."""
  affines = np.stack([cache.affine(i) for i in subjects])
  out = affines[0].copy()
  out[:3, 3] = affines[:, :3, 3].mean(axis=0)
  return out


def latent_meta(config, cache: VolumeCache, step: int, subjects: list[int],
                g: lg.LatentGaussian) -> dict:
  return {
      "checkpoint_step": int(step),
      "slice_axis": int(cache.slice_axis),
      "grid": list(cache.grid),
      "affine": reference_affine(cache, subjects).tolist(),
      "voxel_size": list(cache.voxel_size),
      "latent_shape": [int(config.model.latent_size)] * 2 + [int(config.model.latent_channels)],
      "bn_mode": config.model.bn_mode,
      "num_volumes": len(subjects),
      "subjects": [cache.subjects[i]["id"] for i in subjects],
      "model": g.kind,
      "rank": g.rank,
      "explained_variance": float(np.mean(np.asarray(lg.explained_variance(g)))),
  }


def is_current(workdir: str, step: int) -> bool:
  """True if the latent file exists and was fitted from checkpoint `step`."""
  path = os.path.join(workdir, inference.LATENT_FILE)
  if not os.path.exists(path):
    return False
  try:
    _, meta = lg.load(path)
  except Exception:  # pylint: disable=broad-except
    return False
  return meta.get("checkpoint_step") == step


def fit_latent(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
               mesh=None) -> lg.LatentGaussian:
  """Encodes `latent.num_volumes` training volumes and fits, saves the latent Gaussian."""
  mesh = mesh or parallel.make_mesh()
  bundle = inference.load_for_inference(workdir, mesh=mesh, require_latent=False)
  train_ids = cache.split("train")
  n = min(int(config.latent.num_volumes), len(train_ids))
  rng = np.random.default_rng([config.seed, 4099])
  subjects = sorted(rng.choice(train_ids, size=n, replace=False).tolist())
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
  t1 = time.perf_counter()
  g = lg.fit(y, int(config.latent.rank), model=config.latent.model)
  jax.block_until_ready(g.W)
  t2 = time.perf_counter()
  meta = latent_meta(config, cache, bundle.step, subjects, g)
  meta.update(encode_seconds=t1 - t0, fit_seconds=t2 - t1)
  if jax.process_index() == 0:
    lg.save(os.path.join(workdir, inference.LATENT_FILE), g, meta)
  logging.info("latent Gaussian: N=%d, S=%d, L=%d, rank %d, %.1f%% variance kept; "
               "encode %.1fs, SVD %.1fs", n, y.shape[1], y.shape[2], meta["rank"],
               100 * meta["explained_variance"], t1 - t0, t2 - t1)
  return g
