"""Slice VAE sampling: latent model -> stacks -> vmapped decode -> volumes (sample stage).

What the sample stage (pipeline.write_samples) asks of the slice VAE: a sampler
drawing volume i from fold_in(key(sample.seed), i) through `inference`, the grid
affine from the latent file, and what the set depends on beyond checkpoint step,
count and seed: the BN mode decoding uses and the latent file's SHA-256, so that
`--mode=all` resamples after any refit.
"""

from typing import Any, Callable

import ml_collections
import numpy as np

from slicevae_jax import rng
from slicevae_jax import staleness
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.slicevae import inference


def sample_inputs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What slice VAE samples depend on beyond step, count and seed, for `samples.json`.

  The latent model drawn from, the latent file's SHA-256 (any refit, whatever changed,
  makes new samples) and the BN mode decoding uses.
  """
  return {"latent_model": str(config.latent.model), "bn_mode": str(config.model.bn_mode),
          "latent_sha256": staleness.file_sha256(workdir_lib.latent_file(workdir))}


def sampler(config: ml_collections.ConfigDict, workdir: str, mesh
            ) -> tuple[Callable[[int, int], np.ndarray], np.ndarray, dict[str, Any]]:
  """(sample_fn(start, num) -> volumes [num, X, Y, Z], grid affine, samples.json record)."""
  bundle = inference.load_for_inference(workdir, mesh=mesh)
  key = rng.sample_key(config)
  sample_fn = lambda start, num: inference.sample_volumes(bundle, key, num, start=start)
  record = {"checkpoint_step": bundle.step, "slice_axis": bundle.slice_axis,
            **sample_inputs(bundle.config, workdir)}
  return sample_fn, bundle.affine, record
