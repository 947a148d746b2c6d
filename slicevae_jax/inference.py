"""Trained model in a notebook: load a workdir, encode stacks, decode latents, sample volumes.

    from slicevae_jax import load_for_inference, sample_volumes
    bundle = load_for_inference("runs/demo")
    vols = sample_volumes(bundle, jax.random.key(0), num=4)   # [4, X, Y, Z] in [0, 1]

Stacks are `[N, S, H, W]` (slices along the cache's slice axis), latents
`[N, S, L]` with L = 2·2·256 = 1024, volumes `[N, X, Y, Z]` in the RAS axis
order of the preprocessed input. Volume i of a call depends only on the key and
i, not on how many volumes are drawn or how they are batched.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import config_lib
from slicevae_jax import fileio
from slicevae_jax import latent_gaussian as lg
from slicevae_jax import parallel
from slicevae_jax.data.cache import to_volume
from slicevae_jax.errors import DataError
from slicevae_jax.models import slice_vae

CONFIG_FILE = "config.json"
LATENT_FILE = "latent_gaussian.npz"


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  fileio.write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a workdir was trained with."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing; is {workdir} a slicevae_jax workdir?")
  config = config_lib.base_config()
  _merge(config, fileio.read_json(path))
  return config_lib.validate(config)


def _merge(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
  for k, v in values.items():
    if isinstance(v, dict) and k in config and isinstance(config[k], ml_collections.ConfigDict):
      _merge(config[k], v)
    elif k in config and isinstance(config[k], tuple):
      config[k] = tuple(v)
    else:
      config[k] = v


def restore_variables(config: ml_collections.ConfigDict, workdir: str, mesh=None,
                      step: int | None = None) -> tuple[dict[str, Any], int]:
  """(variables {'params', 'batch_stats'}, step) from the workdir's checkpoints."""
  from slicevae_jax import train  # pylint: disable=import-outside-toplevel
  mesh = mesh or parallel.make_mesh()
  model = slice_vae.from_config(config)
  state, step = ckpt_lib.restore_trained(
      os.path.join(workdir, train.CHECKPOINT_DIR),
      train.abstract_state(model, train.make_optimizer(config), mesh), step)
  return state.variables, step


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def map_volumes(fn, inputs: np.ndarray, batch: int, mesh) -> np.ndarray:
  """Applies a jitted per-chunk `fn` to [N, ...] in chunks sharded over devices.

  Chunks are padded to a multiple of the device count; results are trimmed.
  """
  n_dev = mesh.devices.size
  batch = max(n_dev, -(-batch // n_dev) * n_dev)
  outs = []
  for start in range(0, len(inputs), batch):
    chunk = inputs[start:start + batch]
    size = -(-len(chunk) // n_dev) * n_dev
    padded = _pad_to(chunk, size)
    local = parallel.process_rows(mesh, size)
    out = fn(parallel.global_batch(padded[local], mesh, size))
    outs.append(np.asarray(jax.device_get(_gather_fn(mesh)(out)))[:len(chunk)])
  return np.concatenate(outs)


@functools.lru_cache(maxsize=8)
def _gather_fn(mesh):
  """Replicates a sharded result on every device, so every process can read it whole."""
  return jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))


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
  """Loads a trained workdir: config, checkpoint (newest unless `step`) and latent model."""
  config = load_config(workdir)
  mesh = mesh or parallel.make_mesh()
  variables, step = restore_variables(config, workdir, mesh, step)
  gaussian, meta = None, {}
  latent_path = os.path.join(workdir, LATENT_FILE)
  if os.path.exists(latent_path):
    gaussian, meta = lg.load(latent_path)
  elif require_latent:
    raise DataError(f"{latent_path}: missing; run --mode=fit_latent first")
  return InferenceBundle(config=config, model=slice_vae.from_config(config),
                         variables=variables, step=step, gaussian=gaussian, meta=meta,
                         mesh=mesh)


def _encode_fn(model, variables):
  @jax.jit
  def run(stacks):  # [n, S, H, W] -> [n, S, L]
    def one(stack):
      mu, _ = slice_vae.apply_inference(model, variables, stack[..., None], "encode")
      return mu.reshape(mu.shape[0], -1)
    return jax.vmap(one)(stacks)
  return run


def _decode_fn(model, variables, latent_shape):
  @jax.jit
  def run(latents):  # [n, S, L] -> [n, S, H, W]
    def one(y):
      x = slice_vae.apply_inference(model, variables, y.reshape((-1,) + latent_shape), "decode")
      return jnp.clip(x[..., 0], 0.0, 1.0)
    return jax.vmap(one)(latents)
  return run


def encode_stacks(bundle: InferenceBundle, stacks: np.ndarray, batch: int = 8) -> np.ndarray:
  """Posterior means of every slice: [N, S, H, W] -> [N, S, L] (vmapped over volumes)."""
  fn = _encode_fn(bundle.model, bundle.variables)
  return map_volumes(fn, np.asarray(stacks, np.float32), batch, bundle.mesh)


def decode_latents(bundle: InferenceBundle, latents: np.ndarray, batch: int = 4) -> np.ndarray:
  """Decodes stacks of latents [N, S, L] into volumes [N, X, Y, Z] in [0, 1]."""
  fn = _decode_fn(bundle.model, bundle.variables, bundle.latent_shape)
  stacks = map_volumes(fn, np.asarray(latents, np.float32), batch, bundle.mesh)
  return to_volume(stacks, bundle.slice_axis)


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
