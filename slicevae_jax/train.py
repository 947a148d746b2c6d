"""Slice VAE training: cache -> shuffled slice batches on the mesh -> jitted Adam steps.

`train(config, workdir)` is resumable: it restores the newest checkpoint in
`<workdir>/checkpoints` and continues from its step; since batches and noise are
pure functions of (seed, step), the resumed run matches an uninterrupted one.
Metrics leave the device once per log interval. A non-finite loss stops the
run with `NonFiniteLossError`; the step that produced it is not applied and no
checkpoint is written after it, so the newest checkpoint is the last good one.
"""

import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import losses
from slicevae_jax import parallel
from slicevae_jax import viz
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import NonFiniteLossError
from slicevae_jax.metric_writer import MetricWriter
from slicevae_jax.models import slice_vae

CHECKPOINT_DIR = "checkpoints"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}


def named_keys(seed: int) -> dict[str, jax.Array]:
  """Independent named streams from one root key (resuming needs no RNG state)."""
  root = jax.random.key(seed)
  names = ("init", "train", "eval", "images", "latent", "sample")
  return {n: jax.random.fold_in(root, i) for i, n in enumerate(names)}


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.adam(config.train.learning_rate)


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
  shapes = jax.eval_shape(init_fn(model, tx), jax.random.key(0))
  repl = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


def create_state(model, tx, mesh, key: jax.Array) -> TrainState:
  return jax.jit(init_fn(model, tx), out_shardings=parallel.replicated(mesh))(key)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all()


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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient leaves the state as it was: the host stops
    # at its next check, and nothing bad has reached the parameters.
    finite = jnp.isfinite(loss) & _all_finite(grads)
    new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                     opt_state=opt_state)
    keep = lambda n, o: jnp.where(finite, n, o)
    new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                      batch_stats=jax.tree.map(keep, new.batch_stats, state.batch_stats),
                      opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   finite=finite.astype(jnp.float32))
    return new, metrics

  repl, shard = parallel.replicated(mesh), parallel.sharded(mesh)
  return jax.jit(step, in_shardings=(repl, shard, repl), out_shardings=(repl, repl),
                 donate_argnums=0)


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
  pick = np.random.default_rng([seed, 7919]).choice(total, size=count, replace=count > total)
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


def image_grid(model, state: TrainState, slices_: np.ndarray, key, mesh) -> np.ndarray:
  """Rows: held-out slices, their reconstructions (z = mu), and prior samples."""
  x = jax.device_put(slices_[..., None], parallel.replicated(mesh))

  @jax.jit
  def run(variables, x, key):
    mu, _ = slice_vae.apply_inference(model, variables, x, "encode")
    rec = slice_vae.apply_inference(model, variables, mu, "decode")
    z = jax.random.normal(key, mu.shape)
    prior = slice_vae.apply_inference(model, variables, z, "decode")
    return jnp.clip(rec, 0, 1), jnp.clip(prior, 0, 1)

  rec, prior = jax.device_get(run(state.variables, x, key))
  return viz.grid([slices_, rec[..., 0], prior[..., 0]])


def _progress(total: int, initial: int, unit_scale: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total * unit_scale, initial=initial * unit_scale, unit="slice",
              unit_scale=True, dynamic_ncols=True, desc="train", smoothing=0.1)


def train(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
          mesh=None) -> TrainState:
  """Trains (or resumes training) the slice VAE; returns the final state."""
  t = config.train
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch(t.batch_size, mesh)
  model = slice_vae.from_config(config)
  tx = make_optimizer(config)
  keys = named_keys(config.seed)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), keep=t.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(abstract_state(model, tx, mesh), start)
    logging.info("resumed from checkpoint at step %d", start)
  else:
    state = create_state(model, tx, mesh, keys["init"])
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("slice VAE: %d parameters, %dx%d slices, global batch %d over %d devices",
               n_params, model.slice_size, model.slice_size, t.batch_size, mesh.devices.size)
  if start >= t.num_steps:
    ckpt.close()
    return state

  sampler = slices_lib.SliceSampler(cache, cache.split("train"), t.batch_size, config.seed,
                                    shuffle=t.shuffle)
  local_rows = parallel.process_rows(mesh, t.batch_size)
  train_step = make_train_step(model, tx, t.kl_weight, mesh)
  eval_step = make_eval_step(model, t.kl_weight, mesh)
  n_dev = mesh.devices.size
  val_pairs = _val_pairs(cache, t.num_val_slices, config.seed, n_dev)
  eval_bs = max(n_dev, min(t.batch_size, len(val_pairs[0])) // n_dev * n_dev)
  show = cache.gather(val_pairs[0][:8], val_pairs[1][:8])
  writer = MetricWriter(workdir)
  images_dir = os.path.join(workdir, "images")
  bar = _progress(t.num_steps, start, t.batch_size, t.progress)
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_time, last_step = time.perf_counter(), start

  def flush(step: int) -> None:
    nonlocal pending, last_time, last_step
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending = []
    bad = [s for s, m in zip(steps, fetched) if not m["finite"]]
    if bad:
      good = ckpt.latest_step()
      ckpt.close()
      if bar is not None:
        bar.close()
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {bad[0]} (training stopped; that update "
          f"was not applied). Last good checkpoint: "
          f"{'step %d in %s' % (good, ckpt.directory) if good else 'none yet'}. "
          f"Lower train.learning_rate or check the data.")
    now = time.perf_counter()
    rate = (step - last_step) * t.batch_size / max(now - last_time, 1e-9)
    last_time, last_step = now, step
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "finite"}
    means.update(slices_per_sec=rate, epoch=sampler.epoch_of(step),
                 learning_rate=float(t.learning_rate))
    writer.scalars(step, means)
    logging.info("step %d: loss %.2f recon %.2f kl %.2f | %.0f slices/s", step,
                 means["loss"], means["recon"], means["kl"], rate)
    if bar is not None:
      bar.set_postfix(loss=f"{means['loss']:.1f}", refresh=False)

  try:
    for step, local in slices_lib.prefetch(cache, sampler, start, t.num_steps, local_rows,
                                           config.data.prefetch):
      batch = parallel.global_batch(local, mesh, t.batch_size)
      state, metrics = train_step(state, batch, keys["train"])
      done = step + 1
      pending.append((done, metrics))
      last = done == t.num_steps
      if last or done % t.log_every == 0 or done % t.checkpoint_every == 0:
        flush(done)
      if last or done % t.eval_every == 0:
        val = evaluate(eval_step, state, cache, val_pairs, eval_bs, mesh, keys["eval"])
        writer.scalars(done, val)
        logging.info("step %d: validation loss %.2f", done, val["val_loss"])
        picture = image_grid(model, state, show, jax.random.fold_in(keys["images"], done), mesh)
        if jax.process_index() == 0:
          viz.save_png(os.path.join(images_dir, f"train_{done:07d}.png"), picture)
        writer.image(done, "recon_and_prior", picture)
      if last or done % t.checkpoint_every == 0:
        ckpt.save(done, state)
      if bar is not None:
        bar.update(t.batch_size)
  finally:
    if bar is not None:
      bar.close()
    writer.close()
  ckpt.close()
  return state
