"""3D baselines in the shared stages: config -> networks -> trainer.run -> N(0, I) -> NIfTI.

The update schedules live in `steps.py` and their loss terms in `losses.py`; this
module builds a baseline from its config (`build`, with the reference's settings in
`as_baseline`), plugs it into the same loop as the slice VAE (`trainer.Task`: mesh,
checkpoints, resume, logs, progress bar, non-finite guard), and gives the sample
stage its sampler (pipeline.write_samples writes the slice VAE's layout, so the
evaluate stage scores baselines unchanged). Notebook calls: `load_baseline(workdir)`
and `sample_volumes(bundle, key, num)`.
"""

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import fileio
from slicevae_jax import parallel
from slicevae_jax import rng
from slicevae_jax import trainer
from slicevae_jax import viz
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.baselines import steps
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError, DataError
from slicevae_jax.models import gan3d
from slicevae_jax.models import vae3d

# Learning rates of the released baselines (VAE-GAN 1e-4 in the reference; our 3D VAE 1e-4).
BASELINE_LR = {"wgan_gp": 2e-4, "vae_gan": 1e-4, "alpha_gan": 2e-4, "alpha_wgan": 2e-4,
               "vae3d": 1e-4}


def as_baseline(config: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
  """A copy of `config` that trains the 3D baseline `model` with its reference settings.

  Keeps data, eval, segmenter and baseline groups; sets model_type, the name,
  batch 4 volumes and the model's learning rate.
  """
  if model not in BASELINE_LR:
    raise ConfigError(f"{model!r} is not a 3D baseline; choose one of {sorted(BASELINE_LR)}")
  c = ml_collections.ConfigDict(config.to_dict())
  c.name = f"{model}{int(c.data.grid)}"
  c.model_type = model
  c.train.batch_size = 4
  c.train.learning_rate = BASELINE_LR[model]
  return c


def resolved_norm(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(3D networks' norm, code discriminator's norm) for `config.baseline.norm`.

  'auto': instance norm in the 3D networks and no norm in the code
  discriminator for alpha_gan at grid >= 256, BatchNorm everywhere otherwise.
  'instance' (or 'none') also drops the code discriminator's BatchNorm1D, so
  that no network mixes samples; 'batch' keeps BatchNorm everywhere.
  """
  norm = config.baseline.norm
  if norm == "auto":
    if config.model_type == "alpha_gan" and int(config.data.grid) >= 256:
      return "instance", "none"
    return "batch", "batch"
  if norm == "batch":
    return "batch", "batch"
  return norm, "none"   # 'instance' or 'none' (config_lib.validate allows no other)


def updates_per_iteration(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(critic updates, generator-side updates) per iteration; 0 = the reference's per model.

  `baseline.n_critic` counts discriminator (and code discriminator) updates,
  `baseline.n_gen` generator-side updates (G for WGAN-GP, E+G for α-(W)GAN,
  the decoder for VAE-GAN). Reference: WGAN-GP 1 and 5, the rest 1 and 1.
  """
  b = config.baseline
  d_crit, d_gen = steps.DEFAULT_UPDATES[config.model_type]
  n_critic = int(b.get("n_critic", 0)) or d_crit
  n_gen = int(b.get("n_gen", 0)) or d_gen
  return n_critic, n_gen


def vae3d_latent_dim(config: ml_collections.ConfigDict) -> int:
  """The 3D VAE's latent size: `baseline.vae3d_latent`, or 512·grid/64 when 0 (paper §3.1)."""
  return vae3d.latent_size(int(config.data.grid), int(config.baseline.vae3d_latent))


def build(config: ml_collections.ConfigDict) -> steps.Baseline:
  """The baseline `config.model_type` at `config.data.grid` with `config.baseline` settings.

  Reads config.train.learning_rate (2e-4 for the GANs, 1e-4 for VAE-GAN in the
  reference) and Adam's betas from config.baseline.adam_b1/adam_b2.
  """
  name = config.model_type
  if name not in steps.MODELS:
    raise ConfigError(f"model_type {name!r} is not a 3D baseline; one of {steps.MODELS}")
  b, grid = config.baseline, int(config.data.grid)
  dtype = jnp.bfloat16 if b.dtype == "bfloat16" else jnp.float32
  norm3d, code_norm = resolved_norm(config)
  widths = dict(max_channels=int(b.max_channels), min_channels=int(b.min_channels),
                norm=norm3d, dtype=dtype)
  lat = int(b.latent_dim)
  if name == "wgan_gp":
    nets = {"G": gan3d.Generator(grid, latent_dim=lat, input_layer="linear", **widths),
            "D": gan3d.Discriminator(grid, head="map", **widths)}
  elif name == "vae_gan":
    nets = {"G": gan3d.Generator(grid, latent_dim=lat, input_layer="linear", **widths),
            "D": gan3d.Discriminator(grid, head="scalar", **widths),
            "E": gan3d.VAEGANEncoder(grid, latent_dim=lat, hidden=int(b.encoder_hidden),
                                     **widths)}
  elif name in ("alpha_gan", "alpha_wgan"):
    nets = {"G": gan3d.Generator(grid, latent_dim=lat, input_layer="deconv", **widths),
            "D": gan3d.Discriminator(grid, head="scalar", **widths),
            "E": gan3d.Discriminator(grid, head="scalar", out_features=lat, **widths),
            "CD": gan3d.CodeDiscriminator(hidden=int(b.code_hidden), norm=code_norm,
                                          dtype=dtype)}
  else:
    lat = vae3d_latent_dim(config)
    nets = {"VAE": vae3d.VAE3D(grid, latent_dim=lat, channels=int(b.vae3d_channels),
                               remat=bool(b.vae3d_remat), dtype=dtype)}
  tx = optax.adam(float(config.train.learning_rate), b1=float(b.adam_b1), b2=float(b.adam_b2))
  n_critic, n_gen = updates_per_iteration(config)
  return steps.Baseline(
      name=name, nets=nets, latent_dim=lat, txs={n: tx for n in nets}, grid=grid,
      n_critic=n_critic, n_gen=n_gen, gp_weight=float(b.gp_weight),
      recon_weight=float(b.recon_weight), dec_recon_weight=float(b.vaegan_dec_recon),
      kl_weight=float(b.vae3d_kl_weight), gp_per_voxel=bool(b.gp_per_voxel),
      code_critic_grad_from_zhat=bool(b.code_critic_grad_from_zhat),
      double_g_step=bool(b.get("double_g_step", False)))


def _mid_coronal(volumes: np.ndarray) -> np.ndarray:
  """[n, X, Y, Z] in [0,1] -> upright mid-coronal slices [n, Z, X]."""
  return np.rot90(volumes[:, :, volumes.shape[2] // 2, :], axes=(-2, -1))


def baseline_task(config: ml_collections.ConfigDict, cache: VolumeCache, mesh) -> trainer.Task:
  """A 3D baseline as a `trainer.Task`: shuffled whole volumes in [-1, 1], one schedule step."""
  t = config.train
  model = build(config)
  batches = slices_lib.VolumeSampler(cache, cache.split("train"), t.batch_size,
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
      abstract_state=lambda: trainer.abstract_state(model.init, mesh),
      init_state=lambda: trainer.create_state(model.init, mesh, rng.key(config.seed, "init")),
      train_step=trainer.jit_train_step(model.step, mesh),
      load_batch=lambda step, rows: slices_lib.load_volume_batch(cache, batches, step, rows),
      batch_size=t.batch_size,
      unit="volume",
      evaluate=evaluate if model.has_encoder else None,
      images=images,
      epoch_of=batches.epoch_of,
      log_keys=tuple(model.log_keys))


def write_meta(cache: VolumeCache, workdir: str) -> None:
  """What sampling needs from the cache (affine, grid), so it never opens the cache."""
  if jax.process_index() == 0:
    subjects = cache.split("train")
    fileio.write_json(workdir_lib.baseline_meta(workdir), {
        "affine": cache.reference_affine(subjects).tolist(), "grid": list(cache.grid),
        "voxel_size": list(cache.voxel_size), "slice_axis": int(cache.slice_axis)})


def train(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
          mesh=None) -> steps.GANState:
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
  model: steps.Baseline
  state: steps.GANState
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
  config = workdir_lib.load_config(workdir)
  if config.model_type == "slice_vae":
    raise DataError(f"{workdir}: holds a slice VAE; use slicevae_jax.load_for_inference")
  mesh = mesh or parallel.make_mesh()
  model = build(config)
  state, step = ckpt_lib.restore_trained(workdir_lib.checkpoint_dir(workdir),
                                         trainer.abstract_state(model.init, mesh), step)
  meta_path = workdir_lib.baseline_meta(workdir)
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
  return parallel.map_volumes(lambda zz: bundle.decode_fn(bundle.state, zz),
                              np.asarray(z, np.float32), batch, bundle.mesh)


def sample_volumes(bundle: BaselineBundle, key: jax.Array, num: int = 1, start: int = 0,
                   batch: int = 4) -> np.ndarray:
  """`num` new volumes [num, X, Y, Z] in [0, 1]; volume i depends only on (key, start + i)."""
  return decode(bundle, sample_latents(bundle, key, num, start), batch)


def sampler(config: ml_collections.ConfigDict, workdir: str, mesh
            ) -> tuple[Callable[[int, int], np.ndarray], np.ndarray, dict[str, Any]]:
  """What the sample stage asks of a baseline: (sample_fn(start, num), grid affine, record)."""
  bundle = load_baseline(workdir, mesh=mesh)
  key = rng.sample_key(config)
  batch = int(config.sample.batch_volumes)
  sample_fn = lambda start, num: sample_volumes(bundle, key, num, start=start, batch=batch)
  return sample_fn, bundle.affine, {"checkpoint_step": bundle.step,
                                    "model_type": config.model_type}
