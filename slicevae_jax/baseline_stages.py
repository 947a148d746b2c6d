"""3D baselines through the shared stages: cache volumes -> `trainer.run` -> N(0, I) -> NIfTI.

The networks, losses and update schedules live in `baselines.py`; this module
plugs a baseline into the same loop as the slice VAE (`trainer.Task`: mesh,
checkpoints, resume, logs, progress bar, non-finite guard), writes its samples
in the slice VAE's layout (`<workdir>/samples/` + `samples.json`, so the
evaluate stage scores them unchanged), and offers the notebook calls
`load_baseline(workdir)` and `sample_volumes(bundle, key, num)`.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from slicevae_jax import baselines
from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import fileio
from slicevae_jax import inference
from slicevae_jax import parallel
from slicevae_jax import rng
from slicevae_jax import sample as sample_lib
from slicevae_jax import trainer
from slicevae_jax import viz
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import DataError
from slicevae_jax.fit_latent import reference_affine

META_FILE = "baseline_meta.json"


def abstract_state(model: baselines.Baseline, mesh) -> baselines.GANState:
  """Shapes, dtypes and replicated shardings of the state, without computing it."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  repl = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


def make_train_step(model: baselines.Baseline, mesh):
  """jitted (state, volumes [B,X,Y,Z,1], key) -> (state, metrics); state donated, batch sharded."""
  repl, shard = parallel.replicated(mesh), parallel.sharded(mesh)
  return jax.jit(model.step, in_shardings=(repl, shard, repl), out_shardings=(repl, repl),
                 donate_argnums=0)


def _mid_coronal(volumes: np.ndarray) -> np.ndarray:
  """[n, X, Y, Z] in [0,1] -> upright mid-coronal slices [n, Z, X]."""
  return np.rot90(volumes[:, :, volumes.shape[2] // 2, :], axes=(-2, -1))


def baseline_task(config: ml_collections.ConfigDict, cache: VolumeCache, mesh) -> trainer.Task:
  """A 3D baseline as a `trainer.Task`: shuffled whole volumes in [-1, 1], one schedule step."""
  t = config.train
  model = baselines.build(config)
  sampler = slices_lib.VolumeSampler(cache, cache.split("train"), t.batch_size,
                                     rng.entropy(config.seed, "train_batches"))
  val = cache.split("val") or cache.split("train")
  n_show = min(4, len(val))
  shown = np.stack([cache.volume(i) for i in val[:n_show]])
  repl = parallel.replicated(mesh)
  z_show = model.sample_latent(rng.key(config.seed, "images"), 4)

  @jax.jit
  def pictures(state, x):
    gen = model.generate(state, z_show)[..., 0]
    rec = model.reconstruct(state, x)
    rec = None if rec is None else rec[..., 0]
    return gen, rec

  def images(state, step: int) -> np.ndarray:
    x = jax.device_put(shown[..., None] * 2.0 - 1.0, repl)
    gen, rec = jax.device_get(pictures(state, x))
    to01 = lambda v: np.clip((np.asarray(v) + 1.0) / 2.0, 0.0, 1.0)
    rows = [_mid_coronal(shown)]
    if rec is not None:
      rows.append(_mid_coronal(to01(rec)))
    rows.append(_mid_coronal(to01(gen)))
    return viz.grid(rows)

  @jax.jit
  def val_error(state, x):
    rec = model.reconstruct(state, x)
    return jnp.mean(jnp.abs(rec - x)) / 2.0  # in [0, 1] intensity units

  def evaluate(state, step: int) -> dict[str, float]:
    x = jax.device_put(shown[..., None] * 2.0 - 1.0, repl)
    return {"val_recon_l1": float(val_error(state, x))}

  return trainer.Task(
      name=config.model_type,
      abstract_state=lambda: abstract_state(model, mesh),
      init_state=lambda: jax.jit(model.init, out_shardings=repl)(rng.key(config.seed, "init")),
      train_step=make_train_step(model, mesh),
      load_batch=lambda step, rows: slices_lib.load_volume_batch(cache, sampler, step, rows),
      batch_size=t.batch_size,
      unit="volume",
      evaluate=evaluate if model.has_encoder else None,
      images=images,
      epoch_of=sampler.epoch_of,
      log_keys=tuple(model.log_keys))


def write_meta(cache: VolumeCache, workdir: str) -> None:
  """What sampling needs from the cache (affine, grid), so it never opens the cache."""
  if jax.process_index() == 0:
    subjects = cache.split("train")
    fileio.write_json(os.path.join(workdir, META_FILE), {
        "affine": reference_affine(cache, subjects).tolist(), "grid": list(cache.grid),
        "voxel_size": list(cache.voxel_size), "slice_axis": int(cache.slice_axis)})


def train(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
          mesh=None) -> baselines.GANState:
  """Trains (or resumes) the baseline `config.model_type`; returns the final state."""
  mesh = mesh or parallel.make_mesh()
  write_meta(cache, workdir)
  task = baseline_task(config, cache, mesh)
  return trainer.run(task, config.train, workdir, mesh, rng.key(config.seed, "train"),
                     prefetch=config.data.prefetch)


@dataclasses.dataclass
class BaselineBundle:
  """A trained baseline ready to sample: model, restored state, grid affine."""
  config: ml_collections.ConfigDict
  model: baselines.Baseline
  state: baselines.GANState
  step: int
  affine: np.ndarray
  mesh: Any
  # One jitted decoder per bundle: (state, z [n, latent]) -> volumes [n, X, Y, Z] in [0, 1].
  decode_fn: Any = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    model = self.model
    self.decode_fn = jax.jit(
        lambda state, z: jnp.clip((model.generate(state, z)[..., 0] + 1.0) / 2.0, 0.0, 1.0))


def load_baseline(workdir: str, step: int | None = None, mesh=None) -> BaselineBundle:
  """Loads a trained baseline workdir (newest checkpoint unless `step`)."""
  config = inference.load_config(workdir)
  if config.model_type == "slice_vae":
    raise DataError(f"{workdir}: holds a slice VAE; use slicevae_jax.load_for_inference")
  mesh = mesh or parallel.make_mesh()
  model = baselines.build(config)
  state, step = ckpt_lib.restore_trained(os.path.join(workdir, trainer.CHECKPOINT_DIR),
                                         abstract_state(model, mesh), step)
  meta_path = os.path.join(workdir, META_FILE)
  if not os.path.exists(meta_path):
    raise DataError(f"{meta_path}: missing (written when training starts); run --mode=train")
  affine = np.asarray(fileio.read_json(meta_path)["affine"], np.float64)
  return BaselineBundle(config=config, model=model, state=state, step=int(step), affine=affine,
                        mesh=mesh)


def sample_latents(bundle: BaselineBundle, key: jax.Array, num: int, start: int = 0) -> np.ndarray:
  """Prior samples z_i ~ N(0, I) for volumes start..start+num-1: [num, latent_dim].

  z_i depends only on (key, i), so volume i is the same however the set is batched.
  """
  dim = bundle.model.latent_dim
  idx = jnp.arange(start, start + num)
  one = lambda i: jax.random.normal(jax.random.fold_in(key, i), (dim,), jnp.float32)
  return np.asarray(jax.vmap(one)(idx))


def decode(bundle: BaselineBundle, z: np.ndarray, batch: int = 4) -> np.ndarray:
  """Latents [n, latent_dim] -> volumes [n, X, Y, Z] in [0, 1] (float32, RAS)."""
  return inference.map_volumes(lambda zz: bundle.decode_fn(bundle.state, zz),
                               np.asarray(z, np.float32), batch, bundle.mesh)


def sample_volumes(bundle: BaselineBundle, key: jax.Array, num: int = 1, start: int = 0,
                   batch: int = 4) -> np.ndarray:
  """`num` new volumes [num, X, Y, Z] in [0, 1]; volume i depends only on (key, start + i)."""
  return decode(bundle, sample_latents(bundle, key, num, start), batch)


def write_samples(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> list[str]:
  """The sample stage for a baseline: the same files and index as the slice VAE's."""
  bundle = load_baseline(workdir, mesh=mesh)
  key = jax.random.key(int(config.sample.seed))
  batch = int(config.sample.batch_volumes)
  return sample_lib.write_sample_set(
      config, os.path.join(workdir, sample_lib.SAMPLES_DIR),
      lambda start, num: sample_volumes(bundle, key, num, start=start, batch=batch),
      bundle.affine, {"checkpoint_step": bundle.step, "model_type": config.model_type})
