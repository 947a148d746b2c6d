"""Trained slice VAE in a notebook: workdir -> encode stacks, decode latents, sample volumes.

    from slicevae_jax import load_for_inference, sample_volumes
    bundle = load_for_inference("runs/demo")
    vols = sample_volumes(bundle, jax.random.key(0), num=4)   # [4, X, Y, Z] in [0, 1]

Stacks are `[N, S, H, W]` (slices along the cache's slice axis), latents
`[N, S, L]` with L = 2·2·256 = 1024, volumes `[N, X, Y, Z]` in the RAS axis
order of the preprocessed input. Volume i of a call depends only on the key and
i, not on how many volumes are drawn or how they are batched.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import parallel
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data.cache import to_stack, to_volume
from slicevae_jax.errors import DataError
from slicevae_jax.models import slice_vae
from slicevae_jax.slicevae import latent as lg
from slicevae_jax.slicevae import train


def restore_variables(config: ml_collections.ConfigDict, workdir: str, mesh=None,
                      step: int | None = None) -> tuple[dict[str, Any], int]:
  """(variables {'params', 'batch_stats'}, step) from the workdir's checkpoints."""
  mesh = mesh or parallel.make_mesh()
  model = slice_vae.from_config(config)
  state, step = ckpt_lib.restore_trained(
      workdir_lib.checkpoint_dir(workdir),
      train.abstract_state(model, train.make_optimizer(config), mesh), step)
  return state.variables, step


@dataclasses.dataclass
class InferenceBundle:
  """Everything needed to encode, decode and sample: model, variables, latent model."""
  config: ml_collections.ConfigDict
  model: slice_vae.SliceVAE
  variables: dict[str, Any]
  step: int
  gaussian: lg.LatentGaussian | None
  meta: dict[str, Any]
  mesh: Any

  @property
  def slice_axis(self) -> int:
    return int(self.meta.get("slice_axis", self.config.data.slice_axis))

  @property
  def affine(self) -> np.ndarray:
    return np.asarray(self.meta["affine"], np.float64)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    m = self.model
    return (m.latent_size, m.latent_size, m.latent_channels)


def load_for_inference(workdir: str, step: int | None = None, mesh=None,
                       require_latent: bool = True) -> InferenceBundle:
  """Loads a trained workdir or a model bundle (bundle.py): config, checkpoint (newest unless
  `step`) and latent model."""
  config = workdir_lib.load_config(workdir)
  mesh = mesh or parallel.make_mesh()
  variables, step = restore_variables(config, workdir, mesh, step)
  gaussian, meta = None, {}
  latent_path = workdir_lib.latent_file(workdir)
  if os.path.exists(latent_path):
    gaussian, meta = lg.load(latent_path)
  elif require_latent:
    raise DataError(f"{latent_path}: missing; run --mode=fit_latent first")
  return InferenceBundle(config=config, model=slice_vae.from_config(config),
                         variables=variables, step=step, gaussian=gaussian, meta=meta,
                         mesh=mesh)


def _encode_stack(model, variables, stack):
  """One volume's slices [S, H, W] -> posterior means [S, L]."""
  mu, _ = slice_vae.apply_inference(model, variables, stack[..., None], "encode")
  return mu.reshape(mu.shape[0], -1)


def _decode_stack(model, shape, variables, y):
  """One volume's latents [S, L] -> slices [S, H, W] in [0, 1]."""
  x = slice_vae.apply_inference(model, variables, y.reshape((-1,) + shape), "decode")
  return jnp.clip(x[..., 0], 0.0, 1.0)


def encode_stacks(bundle: InferenceBundle, stacks: np.ndarray, batch: int = 8) -> np.ndarray:
  """Posterior means of every slice: [N, S, H, W] -> [N, S, L] (vmapped over volumes)."""
  return parallel.map_stacks(_encode_stack, bundle.variables, np.asarray(stacks, np.float32),
                             batch, bundle.mesh, static=(bundle.model,))


def decode_latents(bundle: InferenceBundle, latents: np.ndarray, batch: int = 4) -> np.ndarray:
  """Decodes stacks of latents [N, S, L] into volumes [N, X, Y, Z] in [0, 1]."""
  stacks = parallel.map_stacks(_decode_stack, bundle.variables,
                               np.asarray(latents, np.float32), batch, bundle.mesh,
                               static=(bundle.model, tuple(bundle.latent_shape)))
  return to_volume(stacks, bundle.slice_axis)


def reconstruct_volumes(bundle: InferenceBundle, volumes: np.ndarray) -> np.ndarray:
  """Volumes [N, X, Y, Z] encoded to their posterior means and decoded: the decoder's best."""
  c = bundle.config
  latents = encode_stacks(bundle, to_stack(np.asarray(volumes, np.float32), bundle.slice_axis),
                          int(c.latent.encode_batch))
  return decode_latents(bundle, latents, int(c.sample.batch_volumes))


def sample_latents(bundle: InferenceBundle, key: jax.Array, num: int,
                   start: int = 0) -> np.ndarray:
  """Latent stacks [num, S, L] for volumes start..start+num-1 of `key`."""
  if bundle.gaussian is None:
    raise DataError("this bundle has no latent Gaussian; run --mode=fit_latent first")
  return np.asarray(_sample_latents(bundle.gaussian, key, jnp.arange(start, start + num)))


@jax.jit
def _sample_latents(g: lg.LatentGaussian, key: jax.Array, indices: jax.Array) -> jax.Array:
  one = lambda i: lg.sample(g, jax.random.fold_in(key, i), 1)[0]
  return jax.vmap(one)(indices)


def sample_volumes(bundle: InferenceBundle, key: jax.Array, num: int = 1, start: int = 0,
                   batch: int | None = None) -> np.ndarray:
  """New volumes [num, X, Y, Z] in [0, 1]: latent stacks drawn from `bundle.gaussian`, decoded.

  Args:
    bundle: from `load_for_inference`.
    key: a JAX PRNG key; volume i uses fold_in(key, start + i).
    num: number of volumes.
    batch: volumes decoded at once (default config.sample.batch_volumes).
  """
  batch = batch or int(bundle.config.sample.batch_volumes)
  return decode_latents(bundle, sample_latents(bundle, key, num, start), batch)
