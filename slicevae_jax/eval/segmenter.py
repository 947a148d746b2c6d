"""RAS segmenter: labelled real slices -> 2D U-Net (Dice loss) -> label volumes and features.

Trained on coronal slices of the cache's labelled training volumes with a soft
Dice loss, Adam 1e-3, batch 16 (paper §3.3), through the same loop as the slice
VAE (resume, logs, non-finite guard) in `<workdir>/segmenter/`. Validation
reports the Dice per label on held-out volumes, segmented slice by slice.

`segmenter.loss='dice_ce'` adds the pixels' mean cross-entropy to the Dice loss. With
Dice alone, a small structure whose softmax probability falls near zero everywhere
early in training gets almost no gradient back (the softmax saturates) and may never be
predicted again: in short runs (the demo's 1200 steps) whether four of the 14 labels
die depended on the seed, and with them the RAS. The cross-entropy's gradient on a
logit is p − q, which does not vanish on a missed pixel. The
evaluation uses the trained U-Net twice: its labels of generated volumes feed the
RAS (metrics/ras.py), its bottleneck features the segmenter Fréchet distance
(metrics/frechet.py).
"""

import hashlib
import math
import os
import warnings
from typing import Any, Sequence

import dm_pix as pix
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import fileio
from slicevae_jax import parallel
from slicevae_jax import rng
from slicevae_jax import trainer
from slicevae_jax import viz
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.data.cache import VolumeCache, to_stack, to_volume
from slicevae_jax.errors import DataError
from slicevae_jax.metrics import frechet
from slicevae_jax.metrics import registration
from slicevae_jax.models.unet import UNet


@flax.struct.dataclass
class SegState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def soft_dice_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                   eps: float = 1e-5) -> jax.Array:
  """1 − mean over classes of 2Σpq / (Σp + Σq), over the whole batch (Milletari et al.).

  logits [B, H, W, K], labels int [B, H, W]. Classes absent from both the
  batch and the prediction score 1 (eps in both terms), so they do not pull.
  """
  p = jax.nn.softmax(logits, axis=-1)
  q = jax.nn.one_hot(labels, num_classes, dtype=p.dtype)
  inter = jnp.sum(p * q, axis=(0, 1, 2))
  denom = jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(q, axis=(0, 1, 2))
  return 1.0 - jnp.mean((2.0 * inter + eps) / (denom + eps))


def segmenter_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                   kind: str = "dice") -> jax.Array:
  """The training loss `segmenter.loss`: 'dice' (soft Dice) or 'dice_ce' (soft Dice plus
  the mean pixel cross-entropy, in nats, weight 1)."""
  loss = soft_dice_loss(logits, labels, num_classes)
  if kind == "dice_ce":
    loss = loss + jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels))
  elif kind != "dice":
    raise ValueError(f"unknown segmenter loss {kind!r}")
  return loss


def augment(images: jax.Array, key: jax.Array, blur_max: float) -> jax.Array:
  """Blur and contrast changes of training slices [B, H, W, 1] in [0, 1], per slice.

  Half of the slices are blurred by a Gaussian of σ uniform in [0.5, blur_max] pixels (dm-pix)
  and every slice gets a gamma in [1/1.3, 1.3], so the segmenter reads anatomy rather than
  the sharpness and contrast of one scanner: it then labels a smooth generated or
  reconstructed slice by its structures instead of failing on its texture. The labels are
  unchanged (both maps keep the geometry).
  """
  k_sigma, k_apply, k_gamma = jax.random.split(key, 3)
  b = images.shape[0]
  sigma = jax.random.uniform(k_sigma, (b,), minval=0.5, maxval=max(blur_max, 0.5))
  radius = int(math.ceil(3 * max(blur_max, 0.5)))
  blurred = jax.vmap(lambda im, sg: pix.gaussian_blur(im, sg, 2 * radius + 1))(images, sigma)
  apply = jax.random.uniform(k_apply, (b, 1, 1, 1)) < 0.5
  gamma = jnp.exp(jax.random.uniform(k_gamma, (b, 1, 1, 1), minval=-math.log(1.3),
                                     maxval=math.log(1.3)))
  return jnp.clip(jnp.where(apply, blurred, images), 0.0, 1.0) ** gamma


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> UNet:
  return UNet(num_classes=num_classes, widths=tuple(config.segmenter.widths))


def _init_fn(model: UNet, tx, size: int):
  def init(key):
    v = model.init(key, jnp.zeros((1, size, size, 1)), train=False)
    return SegState(step=jnp.zeros((), jnp.int32), params=v["params"],
                    batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))
  return init


def _segment_stack(model: UNet, variables, stack):
  """One volume's slices [S, H, W] -> labels [S, H, W] uint8."""
  logits = model.apply(variables, stack[..., None], train=False)
  return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


def _features_stack(model: UNet, slabs: int, variables, stack):
  """One volume's slices [S, H, W] -> pooled bottleneck features [slabs * C]."""
  h = model.apply(variables, stack[..., None], train=False, features=True)   # [S, h, w, C]
  parts = jnp.array_split(jnp.mean(h, axis=(1, 2)), slabs, axis=0)
  return jnp.concatenate([jnp.mean(p, axis=0) for p in parts])


def segment_volumes(model: UNet, variables, volumes: np.ndarray, slice_axis: int, mesh=None,
                    batch: int = 4) -> np.ndarray:
  """Labels [N, X, Y, Z] uint8 of volumes [N, X, Y, Z], segmented slice by slice."""
  stacks = to_stack(np.asarray(volumes, np.float32), slice_axis)
  out = parallel.map_stacks(_segment_stack, variables, stacks, batch,
                            mesh or parallel.make_mesh(), static=(model,))
  return to_volume(out, slice_axis)


def segmenter_features(model: UNet, variables, volumes: np.ndarray, slice_axis: int, *,
                       slabs: int = 1, batch: int = 4, mesh=None) -> np.ndarray:
  """Per-volume U-Net bottleneck features: volumes [N, X, Y, Z] -> float64 [N, slabs · C].

  What the segmenter Fréchet distance compares (metrics/frechet.py): every slice along
  the slice axis goes through the U-Net encoder to the bottleneck [S, h, w, C], which is
  averaged over h and w, then over the slices of each of `slabs` equal, consecutive slabs
  along the slice axis, concatenated. One sample per volume, not per slice: slices of one
  volume are strongly correlated, which would make a per-slice covariance look far better
  determined than it is; slabs > 1 keeps coarse position along the slice axis.

  Args:
    model: the RAS `UNet`; variables: its {'params', 'batch_stats'}.
    volumes: [N, X, Y, Z] in [0, 1], on the segmenter's grid.
    slice_axis: the volume axis the segmenter was trained to slice along.
    slabs: slabs whose pooled features are concatenated; at most the number of slices.
    batch: volumes per jitted call, sharded over the mesh's devices.
  """
  volumes = np.asarray(volumes, np.float32)
  if volumes.ndim != 4:
    raise DataError(f"segmenter_features expects volumes [N, X, Y, Z], got {volumes.shape}")
  if not 1 <= slabs <= volumes.shape[1 + slice_axis]:
    raise ValueError(f"slabs must be in [1, {volumes.shape[1 + slice_axis]}], got {slabs}")

  out = parallel.map_stacks(_features_stack, variables, to_stack(volumes, slice_axis), batch,
                            mesh or parallel.make_mesh(), static=(model, int(slabs)))
  return np.asarray(out, np.float64)


def segmenter_frechet_distance(model: UNet, variables: Any, volumes_a: Any, volumes_b: Any,
                               slice_axis: int, *, slabs: int = 1, batch: int = 4,
                               mesh: Any = None) -> dict[str, Any]:
  """Segmenter FD between two volume sets [N_a, X, Y, Z], [N_b, X, Y, Z] (N ≥ 2 each).

  Returns dict(fd, dim, n_a, n_b, features_a [N_a, D], features_b [N_b, D]).
  """
  fa = segmenter_features(model, variables, volumes_a, slice_axis, slabs=slabs, batch=batch,
                          mesh=mesh)
  fb = segmenter_features(model, variables, volumes_b, slice_axis, slabs=slabs, batch=batch,
                          mesh=mesh)
  return dict(fd=frechet.frechet_distance(fa, fb), dim=int(fa.shape[1]), n_a=len(fa), n_b=len(fb),
              features_a=fa, features_b=fb)


def segmenter_task(config: ml_collections.ConfigDict, cache: VolumeCache, mesh
                   ) -> tuple[trainer.Task, UNet]:
  s = config.segmenter
  names = cache.label_names()
  k = len(names)
  model = build_model(config, k)
  tx = optax.adam(s.learning_rate)
  size = cache.stack_shape[1]
  root = rng.key(config.seed, "segmenter_init")
  init = _init_fn(model, tx, size)

  def step(state: SegState, batch, key):
    image = batch["image"]
    if s.augment_blur_max > 0:
      image = augment(image, jax.random.fold_in(key, state.step), s.augment_blur_max)
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": state.batch_stats},
                                image, train=True, mutable=["batch_stats"])
      return segmenter_loss(logits, batch["labels"], k, s.loss), upd["batch_stats"]
    (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    _, finite = trainer.finite_norm(loss, grads)

    def update(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return state.replace(params=optax.apply_updates(state.params, updates),
                           batch_stats=bs, opt_state=opt_state)

    return trainer.update_if_finite(finite, update, state), {
        "loss": loss, "finite": finite.astype(jnp.float32)}

  sampler = slices_lib.SliceSampler(cache, cache.split("train"), s.batch_size,
                                    rng.entropy(config.seed, "segmenter_batches"))

  def load(step_: int, rows: np.ndarray):
    r, sl = sampler.pairs(step_)
    return {"image": cache.gather(r[rows], sl[rows])[..., None],
            "labels": cache.gather_labels(r[rows], sl[rows]).astype(np.int32)}

  held_out = (cache.split("val") or cache.split("train"))[:s.num_eval_volumes]

  def evaluate(state: SegState, step_: int) -> dict[str, float]:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    vols = np.stack([cache.volume(i) for i in held_out])
    pred = segment_volumes(model, variables, vols, cache.slice_axis, mesh)
    truth = np.stack([cache.label_volume(i) for i in held_out])
    d = np.asarray(registration.dice(pred, truth, k, ignore_background=False), np.float64)
    with warnings.catch_warnings():   # a label absent from every volume: NaN, as it should
      warnings.simplefilter("ignore", category=RuntimeWarning)
      per = np.nanmean(d, axis=0)
    out = {"val_dice_mean": float(np.nanmean(per[1:]))}
    out.update({f"val_dice/{n}": float(v) for n, v in zip(names[1:], per[1:])})
    return out

  def images(state: SegState, step_: int) -> np.ndarray:
    i = held_out[0]
    vol = cache.volume(i)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    pred = segment_volumes(model, variables, vol[None], cache.slice_axis, mesh)[0]
    mid = vol.shape[cache.slice_axis] // 2
    take = lambda v: np.rot90(np.take(v, mid, axis=cache.slice_axis))
    scale = float(max(k - 1, 1))
    return viz.grid([np.stack([take(vol), take(cache.label_volume(i)) / scale,
                               take(pred) / scale])])

  task = trainer.Task(
      name="segmenter",
      abstract_state=lambda: trainer.abstract_state(init, mesh),
      init_state=lambda: trainer.create_state(init, mesh, root),
      train_step=trainer.jit_train_step(step, mesh),
      load_batch=load, batch_size=s.batch_size, unit="slice", evaluate=evaluate,
      images=images, epoch_of=sampler.epoch_of, log_keys=("loss", "val_dice_mean"))
  return task, model


def train_segmenter(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
                    mesh=None) -> SegState:
  """Trains (or resumes) the RAS segmenter in `<workdir>/segmenter/`."""
  mesh = mesh or parallel.make_mesh()
  task, _ = segmenter_task(config, cache, mesh)
  return trainer.run(task, config.segmenter, workdir_lib.segmenter_dir(workdir), mesh,
                     rng.key(config.seed, "segmenter_train"))


def load_segmenter(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache | None,
                   mesh=None, *, num_classes: int = 0, size: int = 0
                   ) -> tuple[UNet, dict[str, Any]]:
  """(model, variables) of the newest segmenter checkpoint of `workdir` (or a model bundle).

  The network's shape comes from the cache (its label names and slice size) or, for a
  bundle, which has no cache, from `num_classes` and `size`.
  """
  mesh = mesh or parallel.make_mesh()
  if cache is not None:
    num_classes, size = len(cache.label_names()), int(cache.stack_shape[1])
  model = build_model(config, num_classes)
  init = _init_fn(model, optax.adam(config.segmenter.learning_rate), size)
  directory = workdir_lib.checkpoint_dir(workdir_lib.segmenter_dir(workdir))
  if workdir_lib.latest_step(workdir_lib.segmenter_dir(workdir)) is None:
    raise DataError(f"{directory}: no trained RAS segmenter")
  state, _ = ckpt_lib.restore_trained(directory, trainer.abstract_state(init, mesh))
  return model, {"params": state.params, "batch_stats": state.batch_stats}


def variables_digest(variables: Any) -> str:
  """SHA-256 of a network's variables (leaf paths, dtypes, shapes and bytes): which trained
  segmenter a stored result came from, also when a retrained one stopped at the same step."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    value = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def load_bundle_segmenter(config: ml_collections.ConfigDict, bundle_dir: str,
                          grid: Sequence[int], mesh=None
                          ) -> tuple[tuple[UNet, dict[str, Any]], list[str]]:
  """((model, variables), label names) of a model bundle's RAS segmenter, for volumes of
  shape `grid` (refused unless it is the bundle's grid)."""
  names = fileio.read_json(os.path.join(bundle_dir, workdir_lib.BUNDLE_FILE)).get("label_names")
  g = int(config.data.grid)
  if not names or tuple(grid) != (g, g, g):
    raise DataError(f"{bundle_dir}: the bundle has no labelled RAS segmenter, or its grid "
                    f"{(g, g, g)} differs from the volumes' {tuple(grid)}")
  return load_segmenter(config, bundle_dir, None, mesh, num_classes=len(names), size=g), names


def ensure_segmenter(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
                     mesh=None) -> tuple[UNet, dict[str, Any]]:
  """(model, variables) of the workdir's RAS segmenter, trained or resumed first if needed.

  Training happens when the newest finished checkpoint is short of segmenter.num_steps and
  eval.train_segmenter is set; without it, an unfinished segmenter is used with a warning
  and a missing one is a DataError.
  """
  run_dir = workdir_lib.segmenter_dir(workdir)
  step = workdir_lib.latest_step(run_dir)
  if step is None or step < int(config.segmenter.num_steps):
    if config.eval.train_segmenter:
      logging.info("RAS segmenter: training to step %d in %s", config.segmenter.num_steps,
                   run_dir)
      train_segmenter(config, workdir, cache, mesh)
    elif step is None:
      raise DataError(f"{workdir_lib.checkpoint_dir(run_dir)}: no trained RAS segmenter; train "
                      f"it (eval.train_segmenter=True) or point to a workdir that has one")
    else:
      logging.warning("RAS segmenter at step %d of %d (eval.train_segmenter is off)", step,
                      config.segmenter.num_steps)
  return load_segmenter(config, workdir, cache, mesh)
