"""Training stage of every family: batches -> jitted steps on the mesh -> checkpoints and logs.

A model plugs in as a `Task`: how to build and restore its state, a pure jitted
step `(state, batch, key) -> (state, metrics)`, how to load this process's part
of the batch of step k, and optional evaluation and pictures. The loop owns the
rest: restoring the newest checkpoint, prefetching batches, assembling global
batches, metrics once per log interval (JSON lines + TensorBoard), the progress
bar, evaluation and image grids on an interval, checkpoints on an interval and
at the end, and stopping on a non-finite loss with the last good checkpoint
kept. Steps report `finite`; `guard` keeps a non-finite update from ever being
applied, so no checkpoint written afterwards can hold it.
"""

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import parallel
from slicevae_jax import viz
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.errors import NonFiniteLossError
from slicevae_jax.metric_writer import MetricWriter


@dataclasses.dataclass
class Task:
  """A trainable model, as the loop sees it.

  Attributes:
    name: for logs ("slice VAE", "segmenter", "alpha_wgan", ...).
    abstract_state: () -> state of ShapeDtypeStructs with shardings (restore target).
    init_state: () -> initial state, placed on the mesh.
    train_step: jitted (state, batch, key) -> (state, metrics); metrics hold at
      least 'loss' and 'finite' (1.0 / 0.0); the state has an integer `step`.
    load_batch: (step, local_rows) -> this process's rows of the batch of
      `step`: an array [b, ...] or a dict of them; a pure function of step.
    batch_size: global batch size (items per step).
    unit: what one batch item is, for throughput ("slice", "volume").
    evaluate: optional (state, step) -> dict of validation scalars.
    images: optional (state, step) -> 2D uint8 picture (computed by every
      process, written by process 0).
    epoch_of: optional step -> epochs seen.
    log_keys: metrics shown in the log line.
  """
  name: str
  abstract_state: Callable[[], Any]
  init_state: Callable[[], Any]
  train_step: Callable[..., tuple[Any, dict[str, jax.Array]]]
  load_batch: Callable[[int, np.ndarray], Any]
  batch_size: int
  unit: str = "slice"
  evaluate: Callable[[Any, int], dict[str, float]] | None = None
  images: Callable[[Any, int], np.ndarray] | None = None
  epoch_of: Callable[[int], float] | None = None
  log_keys: tuple[str, ...] = ("loss",)


# ---------------------------------------------------------------------------------------------
# The state and step helpers every family builds its Task from.


def abstract_state(init: Callable[[jax.Array], Any], mesh) -> Any:
  """Shapes, dtypes and replicated shardings of `init(key)`'s state, without computing it.

  The restore target of a checkpoint and the parameter count to log (jax.eval_shape).
  """
  shapes = jax.eval_shape(init, jax.random.key(0))
  repl = parallel.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), shapes)


def create_state(init: Callable[[jax.Array], Any], mesh, key: jax.Array) -> Any:
  """`init(key)` computed once, replicated on every device of the mesh."""
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(key)


def jit_train_step(step: Callable[..., tuple[Any, Any]], mesh) -> Callable:
  """jitted (state, batch, key) -> (state, metrics): state replicated and donated, batch
  sharded over the data axis."""
  repl, shard = parallel.replicated(mesh), parallel.sharded(mesh)
  return jax.jit(step, in_shardings=(repl, shard, repl), out_shardings=(repl, repl),
                 donate_argnums=0)


def all_finite(tree) -> jax.Array:
  """True iff every entry of every leaf is finite."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]).all()


def update_if_finite(finite: jax.Array, update: Callable[[Any], Any], state):
  """`update(state)` if `finite`, else `state` unchanged; the step counter advances.

  A `lax.cond`: the update (the optimizer's arithmetic over every parameter) runs only
  when it is kept, and writes in place into the donated state. Selecting leaf by leaf
  between the old and new state (`guard`) costs a copy of the old state and a select
  pass over every leaf, about 8% of a 64² slice VAE step on a CPU.
  """
  kept = jax.lax.cond(finite, update, lambda s: s, state)
  return kept.replace(step=state.step + 1)


def finite_norm(loss: jax.Array, grads) -> tuple[jax.Array, jax.Array]:
  """(global L2 norm of `grads`, True iff the loss and that norm are finite).

  A NaN or infinite entry makes the norm non-finite, so one pass over the gradients
  gives both the logged norm and the check (a norm that overflows float32, entries
  beyond ~1e19, also counts as non-finite).
  """
  norm = optax.tree.norm(grads)
  return norm, jnp.isfinite(loss) & jnp.isfinite(norm)


def guard(old, new, finite: jax.Array):
  """`new` where `finite`, else `old` leaf by leaf, except the step counter advances."""
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return kept.replace(step=new.step) if hasattr(kept, "replace") else kept


def _global(local, mesh, size: int):
  return jax.tree.map(lambda x: parallel.global_batch(x, mesh, size), local)


def _progress(total: int, initial: int, batch: int, unit: str, enabled: bool, name: str):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total * batch, initial=initial * batch, unit=unit, unit_scale=True,
              dynamic_ncols=True, desc=name, smoothing=0.1)


def run(task: Task, train_cfg, run_dir: str, mesh, key: jax.Array, prefetch: int = 2) -> Any:
  """Trains `task` to `train_cfg.num_steps`, resuming from `run_dir`; returns the state.

  `train_cfg` is a config group with num_steps, log_every, eval_every,
  checkpoint_every, keep_checkpoints and progress. `key` is the training
  stream; step k uses fold_in(key, k) inside the step. Checkpoints, scalars and
  pictures go where workdir.py puts them in `run_dir` (a workdir, or its segmenter/).
  """
  t = train_cfg
  parallel.check_batch(task.batch_size, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir_lib.checkpoint_dir(run_dir), keep=t.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(task.abstract_state(), start)
    logging.info("%s: resumed from checkpoint at step %d", task.name, start)
  else:
    state = task.init_state()
  n_params = sum(x.size for x in jax.tree.leaves(getattr(state, "params", state)))
  logging.info("%s: %d parameters, global batch %d %ss over %d devices", task.name, n_params,
               task.batch_size, task.unit, mesh.devices.size)
  if start >= t.num_steps:
    ckpt.close()
    return state

  local_rows = parallel.process_rows(mesh, task.batch_size)
  writer = MetricWriter(run_dir)
  bar = _progress(t.num_steps, start, task.batch_size, task.unit, t.progress, task.name)
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  clock = {"time": time.perf_counter(), "step": start}

  def flush(step: int) -> None:
    nonlocal pending
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending = []
    bad = [s for s, m in zip(steps, fetched) if not m["finite"]]
    if bad:
      good = ckpt.latest_step()
      ckpt.close()
      raise NonFiniteLossError(
          f"{task.name}: non-finite loss or gradient at step {bad[0]} (training stopped; "
          f"that update was not applied). Last good checkpoint: "
          f"{'step %d in %s' % (good, ckpt.directory) if good else 'none yet'}. "
          f"Lower the learning rate or check the data.")
    now = time.perf_counter()
    rate = (step - clock["step"]) * task.batch_size / max(now - clock["time"], 1e-9)
    clock.update(time=now, step=step)
    means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "finite"}
    means[f"{task.unit}s_per_sec"] = rate
    if task.epoch_of is not None:
      means["epoch"] = task.epoch_of(step)
    writer.scalars(step, means)
    shown = " ".join(f"{k} {means[k]:.4g}" for k in task.log_keys if k in means)
    logging.info("%s step %d: %s | %.1f %ss/s", task.name, step, shown, rate, task.unit)
    if bar is not None:
      bar.set_postfix({k: f"{means[k]:.4g}" for k in task.log_keys[:2] if k in means},
                      refresh=False)

  load = lambda step: task.load_batch(step, local_rows)
  try:
    for step, local in slices_lib.prefetch(load, start, t.num_steps, prefetch):
      state, metrics = task.train_step(state, _global(local, mesh, task.batch_size), key)
      done = step + 1
      pending.append((done, metrics))
      last = done == t.num_steps
      if last or done % t.log_every == 0 or done % t.checkpoint_every == 0:
        flush(done)
      if (last or done % t.eval_every == 0) and task.evaluate is not None:
        val = task.evaluate(state, done)
        writer.scalars(done, val)
        logging.info("%s step %d: %s", task.name, done,
                     " ".join(f"{k} {v:.4g}" for k, v in val.items()))
      if (last or done % t.eval_every == 0) and task.images is not None:
        picture = task.images(state, done)
        if jax.process_index() == 0:
          viz.save_png(workdir_lib.training_image(run_dir, done), picture)
        writer.image(done, "samples", picture)
      if last or done % t.checkpoint_every == 0:
        ckpt.save(done, state)
      if bar is not None:
        bar.update(task.batch_size)
  finally:
    if bar is not None:
      bar.close()
    writer.close()
  ckpt.close()
  return state
