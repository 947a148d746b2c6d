"""RAS segmenter: Dice loss, per-label Dice, training raises validation Dice, resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_cache, tiny_config
from slicevae_jax.errors import DataError
from slicevae_jax.eval import segmenter
from slicevae_jax.metric_writer import read_metrics
from slicevae_jax.metrics import registration


def test_soft_dice_loss_is_zero_for_perfect_logits_and_one_for_wrong():
  labels = jnp.array(np.random.default_rng(0).integers(0, 3, (2, 8, 8)))
  perfect = 100.0 * jax.nn.one_hot(labels, 3)
  assert float(segmenter.soft_dice_loss(perfect, labels, 3)) < 1e-3
  wrong = 100.0 * jax.nn.one_hot((labels + 1) % 3, 3)
  assert float(segmenter.soft_dice_loss(wrong, labels, 3)) > 0.99


def test_dice_ce_keeps_a_gradient_for_a_label_the_network_stopped_predicting():
  labels = jnp.array(np.random.default_rng(0).integers(0, 3, (2, 8, 8)))
  logits = jnp.array(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  logits = logits.at[..., 2].set(-30.0)     # label 2 present, predicted nowhere
  dice = segmenter.segmenter_loss(logits, labels, 3, "dice")
  assert float(dice) == pytest.approx(float(segmenter.soft_dice_loss(logits, labels, 3)))
  ce = float(segmenter.segmenter_loss(logits, labels, 3, "dice_ce")) - float(dice)
  q = np.asarray(jax.nn.one_hot(labels, 3))
  want = -np.mean(np.sum(q * np.asarray(jax.nn.log_softmax(logits)), -1))
  assert ce == pytest.approx(want, rel=1e-4) and ce > 5
  grad = lambda kind: jax.grad(lambda lg: segmenter.segmenter_loss(lg, labels, 3, kind))(logits)
  on_missed = lambda g: float(jnp.abs(jnp.where(labels == 2, g[..., 2], 0.0)).sum())
  # The softmax saturates: Dice alone hands the dead label's logits almost nothing back;
  # the cross-entropy gives each of its pixels (p - q) / N, about -1/N.
  assert on_missed(grad("dice")) < 1e-9
  assert on_missed(grad("dice_ce")) == pytest.approx(float((labels == 2).sum()) / labels.size,
                                                     rel=1e-3)
  with pytest.raises(ValueError, match="focal"):
    segmenter.segmenter_loss(logits, labels, 3, "focal")


def test_variables_digest_names_the_trained_network():
  v = {"params": {"a": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "batch_stats": {"m": jnp.ones(2)}}
  d = segmenter.variables_digest(v)
  assert d == segmenter.variables_digest(jax.tree.map(jnp.array, v)) and len(d) == 64
  assert d != segmenter.variables_digest(
      {**v, "params": {**v["params"], "b": v["params"]["b"].at[1].set(1e-7)}})
  assert d != segmenter.variables_digest({**v, "params": {"a": v["params"]["b"],
                                                          "b": v["params"]["a"]}})


def test_dice_per_label():
  a = np.array([0, 1, 1, 2, 2, 2])
  b = np.array([0, 1, 2, 2, 2, 0])
  # The segmenter's validation Dice is the RAS's own, with the background kept.
  d = np.asarray(registration.dice(a.reshape(1, 1, 6), b.reshape(1, 1, 6), 4,
                                   ignore_background=False))
  np.testing.assert_allclose(d[:3], [2 * 1 / 3, 2 * 1 / 3, 2 * 2 / 6])
  assert np.isnan(d[3])


def test_segmenter_trains_dice_rises_and_resumes(tmp_path):
  cache = make_cache(str(tmp_path / "c"), num=6, grid=16, num_val=2)
  config = tiny_config()
  s = config.segmenter
  s.widths, s.num_steps, s.log_every, s.eval_every = (8, 16), 60, 20, 30
  s.checkpoint_every, s.progress, s.num_eval_volumes = 30, False, 2
  workdir = str(tmp_path / "w")
  s.num_steps = 1
  segmenter.train_segmenter(config, workdir, cache)
  first = [r for r in read_metrics(os.path.join(workdir, "segmenter")) if "val_dice_mean" in r]
  s.num_steps = 60
  segmenter.train_segmenter(config, workdir, cache)   # resumes from step 1
  recs = [r for r in read_metrics(os.path.join(workdir, "segmenter")) if "val_dice_mean" in r]
  assert [r["step"] for r in recs] == [1, 30, 60]
  assert recs[-1]["val_dice_mean"] > first[0]["val_dice_mean"] + 0.2
  assert recs[-1]["val_dice_mean"] > 0.45
  model, variables = segmenter.load_segmenter(config, workdir, cache)
  pred = segmenter.segment_volumes(model, variables, cache.volume(4)[None], cache.slice_axis)
  assert pred.shape == (1, 16, 16, 16) and pred.dtype == np.uint8


def test_segmenter_needs_labels(tmp_path):
  cache = make_cache(str(tmp_path / "c"), num=3, grid=16, num_val=1, labels=False)
  with pytest.raises(DataError, match="no labels"):
    segmenter.train_segmenter(tiny_config(), str(tmp_path / "w"), cache)


def test_augment_blurs_and_shifts_contrast_within_range():
  x = np.zeros((8, 16, 16, 1), np.float32)
  x[:, 4:12, 4:12] = 0.8
  out = np.asarray(segmenter.augment(jnp.asarray(x), jax.random.key(0), 2.0))
  assert out.shape == x.shape and 0.0 <= out.min() and out.max() <= 1.0
  assert not np.allclose(out, x)
  # Blurred slices have intermediate values at the square's edge; sharp ones do not.
  edge = out[:, 3, 8, 0]
  assert np.any(edge > 0.01)
  # Same key, same augmentation (the step folds the step number into its key).
  again = np.asarray(segmenter.augment(jnp.asarray(x), jax.random.key(0), 2.0))
  np.testing.assert_array_equal(out, again)
