"""RAS segmenter: labelled real slices -> 2D U-Net (Dice loss) -> label volumes.

Trained on coronal slices of the cache's labelled training volumes with a soft
Dice loss, Adam 1e-3, batch 16 (paper §3.3), through the same loop as the slice
VAE (resume, logs, non-finite guard) in `<workdir>/segmenter/`. Validation
reports the Dice per label on held-out volumes, segmented slice by slice.
"""

import math
import os
from typing import Any

import dm_pix as pix
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import parallel
from slicevae_jax import rng
from slicevae_jax import trainer
from slicevae_jax import viz
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.data.cache import VolumeCache, to_volume
from slicevae_jax.errors import DataError
from slicevae_jax.models.unet import UNet

SUBDIR = "segmenter"


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


def dice_per_label(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
  """Hard Dice per label [K] (NaN where a label is in neither map)."""
  pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
  inter = np.bincount(pred[pred == truth], minlength=num_classes)[:num_classes]
  total = (np.bincount(pred, minlength=num_classes)[:num_classes]
           + np.bincount(truth, minlength=num_classes)[:num_classes])
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, 2.0 * inter / total, np.nan)


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


def label_names(cache: VolumeCache) -> list[str]:
  names = cache.manifest.get("label_names")
  if not cache.manifest.get("has_labels") or not names:
    raise DataError(f"{cache.path}: the segmenter needs labelled volumes; this cache has no "
                    f"labels (give label files: HCP aparc+aseg or data.labels_dir)")
  return list(names)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> UNet:
  return UNet(num_classes=num_classes, widths=tuple(config.segmenter.widths))


def _init_fn(model: UNet, tx, size: int):
  def init(key):
    v = model.init(key, jnp.zeros((1, size, size, 1)), train=False)
    return SegState(step=jnp.zeros((), jnp.int32), params=v["params"],
                    batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))
  return init


def _segment_fn(model: UNet):
  @jax.jit
  def run(variables, stacks):  # [n, S, H, W] -> [n, S, H, W] labels
    logits = jax.vmap(lambda s: model.apply(variables, s[..., None], train=False))(stacks)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)
  return run


def segment_volumes(model: UNet, variables, volumes: np.ndarray, slice_axis: int, mesh=None,
                    batch: int = 4) -> np.ndarray:
  """Labels [N, X, Y, Z] uint8 of volumes [N, X, Y, Z], segmented slice by slice."""
  from slicevae_jax import inference  # pylint: disable=import-outside-toplevel
  mesh = mesh or parallel.make_mesh()
  stacks = np.moveaxis(np.asarray(volumes, np.float32), slice_axis + 1, 1)  # [N, S, H, W]
  fn = _segment_fn(model)
  out = inference.map_volumes(lambda x: fn(variables, x), stacks, batch, mesh)
  return to_volume(out, slice_axis)


def segmenter_task(config: ml_collections.ConfigDict, cache: VolumeCache, mesh
                   ) -> tuple[trainer.Task, UNet]:
  s = config.segmenter
  names = label_names(cache)
  k = len(names)
  model = build_model(config, k)
  tx = optax.adam(s.learning_rate)
  size = cache.stack_shape[1]
  root = rng.key(config.seed, "segmenter_init")
  init = _init_fn(model, tx, size)
  repl, shard = parallel.replicated(mesh), parallel.sharded(mesh)

  def step(state: SegState, batch, key):
    image = batch["image"]
    if s.augment_blur_max > 0:
      image = augment(image, jax.random.fold_in(key, state.step), s.augment_blur_max)
    def loss_fn(params):
      logits, upd = model.apply({"params": params, "batch_stats": state.batch_stats},
                                image, train=True, mutable=["batch_stats"])
      return soft_dice_loss(logits, batch["labels"], k), upd["batch_stats"]
    (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss) & trainer.all_finite(grads)
    new = SegState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                   batch_stats=bs, opt_state=opt_state)
    return trainer.guard(state, new, finite), {"loss": loss,
                                               "finite": finite.astype(jnp.float32)}

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
    d = np.stack([dice_per_label(p, cache.label_volume(i), k) for p, i in zip(pred, held_out)])
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
      abstract_state=lambda: jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
          jax.eval_shape(init, root)),
      init_state=lambda: jax.jit(init, out_shardings=repl)(root),
      train_step=jax.jit(step, in_shardings=(repl, shard, repl), out_shardings=(repl, repl),
                         donate_argnums=0),
      load_batch=load, batch_size=s.batch_size, unit="slice", evaluate=evaluate,
      images=images, epoch_of=sampler.epoch_of, log_keys=("loss", "val_dice_mean"))
  return task, model


def train_segmenter(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
                    mesh=None) -> SegState:
  """Trains (or resumes) the RAS segmenter in `<workdir>/segmenter/`."""
  mesh = mesh or parallel.make_mesh()
  task, _ = segmenter_task(config, cache, mesh)
  return trainer.run(task, config.segmenter, os.path.join(workdir, SUBDIR), mesh,
                     rng.key(config.seed, "segmenter_train"))


def load_segmenter(config: ml_collections.ConfigDict, workdir: str, cache: VolumeCache,
                   mesh=None) -> tuple[UNet, dict[str, Any]]:
  """(model, variables) of the newest segmenter checkpoint."""
  mesh = mesh or parallel.make_mesh()
  task, model = segmenter_task(config, cache, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, SUBDIR, trainer.CHECKPOINT_DIR),
                               read_only=True)
  state = ckpt.restore(task.abstract_state())
  ckpt.close()
  return model, {"params": state.params, "batch_stats": state.batch_stats}
