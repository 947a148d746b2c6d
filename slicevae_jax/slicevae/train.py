"""Slice VAE training stage: cache -> shuffled slice batches on the mesh -> jitted Adam steps.

The model-specific half of training (state, step, evaluation, pictures) as a
`trainer.Task`; the loop itself (resume, logging, checkpoints, non-finite guard)
is `trainer.run`. `train(config, workdir, cache)` resumes from the newest
checkpoint in the workdir; batches and noise are pure functions of (seed, step)
through the named streams of `rng`, so the resumed run matches an
uninterrupted one.
"""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from slicevae_jax import parallel
from slicevae_jax import rng
from slicevae_jax import trainer
from slicevae_jax import viz
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.models import slice_vae
from slicevae_jax.slicevae import losses


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate(config: ml_collections.ConfigDict) -> float | optax.Schedule:
  """train.learning_rate as given ('constant', the paper's), or warmed up and cosine-decayed.

  'cosine' rises linearly over train.warmup_steps, then follows a half cosine down to
  train.final_lr_fraction of the peak at train.num_steps: at a short budget it reaches a
  lower loss than a constant rate, since the late steps take small, low-noise updates.
  """
  t = config.train
  if t.lr_schedule == "constant":
    return float(t.learning_rate)
  warmup = min(int(t.warmup_steps), max(int(t.num_steps) - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(t.learning_rate), warmup_steps=warmup,
      decay_steps=max(int(t.num_steps), warmup + 1),
      end_value=float(t.learning_rate) * float(t.final_lr_fraction))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.adam(learning_rate(config))


def init_fn(model: slice_vae.SliceVAE, tx: optax.GradientTransformation
            ) -> Callable[[jax.Array], TrainState]:
  def init(key: jax.Array) -> TrainState:
    x = jnp.zeros((1, model.slice_size, model.slice_size, 1), jnp.float32)
    variables = model.init({"params": key}, x, jax.random.key(0), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables["batch_stats"], opt_state=tx.init(params))
  return init


def abstract_state(model, tx, mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the state, without computing it."""
  return trainer.abstract_state(init_fn(model, tx), mesh)


def create_state(model, tx, mesh, key: jax.Array) -> TrainState:
  return trainer.create_state(init_fn(model, tx), mesh, key)


def make_train_step(model: slice_vae.SliceVAE, tx: optax.GradientTransformation,
                    kl_weight: float, mesh) -> Callable:
  """jitted (state, batch [B,H,W,1], key) -> (state, metrics); state is donated."""

  def step(state: TrainState, batch: jax.Array, key: jax.Array):
    key = jax.random.fold_in(key, state.step)

    def loss_fn(params):
      (x_hat, mu, logvar), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch, key, train=True,
          mutable=["batch_stats"])
      loss, metrics = losses.vae_loss(x_hat, batch, mu, logvar, kl_weight)
      return loss, (metrics, updates["batch_stats"])

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    # A non-finite loss or gradient leaves the state as it was: the host stops
    # at its next check, and nothing bad has reached the parameters.
    grad_norm, finite = trainer.finite_norm(loss, grads)

    def update(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return state.replace(params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state)

    new = trainer.update_if_finite(finite, update, state)
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return new, metrics

  return trainer.jit_train_step(step, mesh)


def make_eval_step(model: slice_vae.SliceVAE, kl_weight: float, mesh) -> Callable:
  """jitted (variables, batch, key) -> summed loss terms over the batch (inference BN)."""

  def step(variables, batch, key):
    mu, logvar = slice_vae.apply_inference(model, variables, batch, "encode")
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
    x_hat = slice_vae.apply_inference(model, variables, z, "decode")
    rec = losses.squared_error(x_hat, batch)
    kl = losses.gaussian_kl(mu, logvar)
    return {"val_loss": jnp.sum(rec + kl_weight * kl), "val_recon": jnp.sum(rec),
            "val_kl": jnp.sum(kl), "count": jnp.asarray(batch.shape[0], jnp.float32)}

  repl, shard = parallel.replicated(mesh), parallel.sharded(mesh)
  return jax.jit(step, in_shardings=(repl, shard, repl), out_shardings=repl)


def _val_pairs(cache: VolumeCache, count: int, seed: int, multiple: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """A fixed, seeded set of held-out (row, slice) pairs, `multiple`-aligned."""
  subjects = cache.split("val") or cache.split("train")
  rows = cache.rows(subjects)
  s = cache.stack_shape[0]
  total = len(rows) * s
  count = max(multiple, min(count, total) // multiple * multiple)
  pick = rng.generator(seed, "val_slices").choice(total, size=count, replace=count > total)
  return rows[pick // s], pick % s


def evaluate(eval_step, state: TrainState, cache: VolumeCache, pairs, batch_size: int,
             mesh, key) -> dict[str, float]:
  """Mean validation loss terms over the fixed held-out slices."""
  rows, sl = pairs
  totals: dict[str, float] = {}
  for start in range(0, len(rows), batch_size):
    r, s = rows[start:start + batch_size], sl[start:start + batch_size]
    local = parallel.process_rows(mesh, len(r))
    batch = parallel.global_batch(cache.gather(r[local], s[local])[..., None], mesh, len(r))
    out = jax.device_get(eval_step(state.variables, batch, jax.random.fold_in(key, start)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = totals.pop("count")
  return {k: v / count for k, v in totals.items()}


@functools.partial(jax.jit, static_argnums=0)
def _grid_images(model: slice_vae.SliceVAE, variables, x: jax.Array, key: jax.Array):
  """Reconstructions (z = mu) of x and decoded prior draws, clipped to [0, 1]."""
  mu, _ = slice_vae.apply_inference(model, variables, x, "encode")
  rec = slice_vae.apply_inference(model, variables, mu, "decode")
  z = jax.random.normal(key, mu.shape)
  prior = slice_vae.apply_inference(model, variables, z, "decode")
  return jnp.clip(rec, 0, 1), jnp.clip(prior, 0, 1)


def image_grid(model, state: TrainState, slices_: np.ndarray, key, mesh) -> np.ndarray:
  """Rows: held-out slices, their reconstructions (z = mu), and prior samples."""
  x = jax.device_put(slices_[..., None], parallel.replicated(mesh))
  rec, prior = jax.device_get(_grid_images(model, state.variables, x, key))
  # Slices of a RAS volume, turned so that superior (or anterior) is up.
  upright = lambda a: np.rot90(a, axes=(-2, -1))
  return viz.grid([upright(slices_), upright(rec[..., 0]), upright(prior[..., 0])])


def slice_vae_task(config: ml_collections.ConfigDict, cache: VolumeCache, mesh
                   ) -> trainer.Task:
  """The slice VAE as a `trainer.Task`: shuffled slices in, negative β-ELBO out."""
  t = config.train
  model = slice_vae.from_config(config)
  tx = make_optimizer(config)
  sampler = slices_lib.SliceSampler(cache, cache.split("train"), t.batch_size,
                                    rng.entropy(config.seed, "train_batches"), shuffle=t.shuffle)
  eval_step = make_eval_step(model, t.kl_weight, mesh)
  n_dev = mesh.devices.size
  val_pairs = _val_pairs(cache, t.num_val_slices, config.seed, n_dev)
  eval_bs = max(n_dev, min(t.batch_size, len(val_pairs[0])) // n_dev * n_dev)
  show = cache.gather(val_pairs[0][:8], val_pairs[1][:8])
  eval_key, images_key = rng.key(config.seed, "eval"), rng.key(config.seed, "images")
  return trainer.Task(
      name="slice VAE",
      abstract_state=lambda: abstract_state(model, tx, mesh),
      init_state=lambda: create_state(model, tx, mesh, rng.key(config.seed, "init")),
      train_step=make_train_step(model, tx, t.kl_weight, mesh),
      # Through the module attribute, so tests can substitute the loader.
      load_batch=lambda step, rows: slices_lib.load_batch(cache, sampler, step, rows),
      batch_size=t.batch_size,
      unit="slice",
      evaluate=lambda state, step: evaluate(eval_step, state, cache, val_pairs, eval_bs, mesh,
                                            eval_key),
      images=lambda state, step: image_grid(model, state, show,
                                            jax.random.fold_in(images_key, step), mesh),
      epoch_of=sampler.epoch_of,
      log_keys=("loss", "recon", "kl", "val_loss"))


def train(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
          mesh=None) -> TrainState:
  """Trains (or resumes training) the slice VAE; returns the final state."""
  mesh = mesh or parallel.make_mesh()
  task = slice_vae_task(config, cache, mesh)
  return trainer.run(task, config.train, workdir, mesh, rng.key(config.seed, "train"),
                     prefetch=config.data.prefetch)
