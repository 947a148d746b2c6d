"""Training invariants: device count, resume, non-finite guard, outputs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import identifiable_params, make_cache, tiny_config
from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import parallel
from slicevae_jax import trainer
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.errors import ConfigError, NonFiniteLossError
from slicevae_jax.metric_writer import read_metrics
from slicevae_jax.slicevae import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return make_cache(str(tmp_path_factory.mktemp("c") / "cache"))


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_one_and_eight_devices_give_the_same_loss(cache, tmp_path):
  assert jax.device_count() == 8
  cfg = tiny_config(num_steps=3)
  s8 = train.train(cfg, str(tmp_path / "d8"), cache, mesh=parallel.make_mesh(8))
  s1 = train.train(cfg, str(tmp_path / "d1"), cache, mesh=parallel.make_mesh(1))
  l8, l1 = _losses(str(tmp_path / "d8")), _losses(str(tmp_path / "d1"))
  assert sorted(l8) == [1, 2, 3]
  for step in l8:
    np.testing.assert_allclose(l8[step], l1[step], rtol=1e-4)
  p8, p1 = identifiable_params(s8.params), identifiable_params(s1.params)
  for k in p8:
    np.testing.assert_allclose(p8[k], p1[k], rtol=1e-4, atol=2e-5, err_msg=k)


def test_resume_equals_uninterrupted(cache, tmp_path):
  full = train.train(tiny_config(num_steps=3), str(tmp_path / "full"), cache)
  part = str(tmp_path / "part")
  train.train(tiny_config(num_steps=2, checkpoint_every=2), part, cache)
  assert ckpt_lib.Checkpointer(os.path.join(part, "checkpoints")).latest_step() == 2
  resumed = train.train(tiny_config(num_steps=3), part, cache)
  assert int(resumed.step) == int(full.step) == 3
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(full.opt_state), jax.tree.leaves(resumed.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cache, tmp_path, monkeypatch):
  real = slices_lib.load_batch

  def poisoned(cache_, sampler, step, rows):
    batch = real(cache_, sampler, step, rows)
    return batch * np.nan if step >= 3 else batch

  monkeypatch.setattr(slices_lib, "load_batch", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(NonFiniteLossError, match=r"step 4.*step 2"):
    train.train(tiny_config(num_steps=8, checkpoint_every=2, log_every=2), workdir, cache)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [2]
  model_cfg = tiny_config()
  from slicevae_jax.models import slice_vae
  model = slice_vae.from_config(model_cfg)
  state = ckpt.restore(train.abstract_state(model, train.make_optimizer(model_cfg),
                                            parallel.make_mesh()))
  assert all(np.isfinite(p).all() for p in _params(state))


def test_finite_norm_flags_nan_and_inf_gradients():
  g = {"a": jnp.ones((3, 2)), "b": jnp.full((4,), 2.0)}
  norm, ok = trainer.finite_norm(jnp.float32(1.0), g)
  assert bool(ok) and float(norm) == pytest.approx(np.sqrt(6 + 16))
  for bad in (np.nan, np.inf, -np.inf):
    _, ok = trainer.finite_norm(jnp.float32(1.0), {**g, "b": g["b"].at[2].set(bad)})
    assert not bool(ok)
  assert not bool(trainer.finite_norm(jnp.float32(np.nan), g)[1])


def test_step_on_a_non_finite_batch_keeps_the_state_and_counts_the_step():
  cfg = tiny_config()
  from slicevae_jax.models import slice_vae
  model, mesh = slice_vae.from_config(cfg), parallel.make_mesh()
  tx = train.make_optimizer(cfg)
  step = train.make_train_step(model, tx, 0.2, mesh)
  x = np.random.default_rng(0).random((16, 16, 16, 1), np.float32)
  state, m = step(train.create_state(model, tx, mesh, jax.random.key(0)),
                  parallel.global_batch(x, mesh, 16), jax.random.key(1))
  assert float(m["finite"]) == 1.0 and int(state.step) == 1
  leaves = lambda st: [np.asarray(v) for v in jax.tree.leaves(
      (st.params, st.batch_stats, st.opt_state))]
  before = leaves(state)
  for k, poison in enumerate((np.nan, np.inf)):
    state, m = step(state, parallel.global_batch(x * poison, mesh, 16), jax.random.key(1))
    assert float(m["finite"]) == 0.0 and int(state.step) == 2 + k
    for a, b in zip(leaves(state), before):
      np.testing.assert_array_equal(a, b)
  # ...and a finite batch afterwards updates the parameters again.
  state, m = step(state, parallel.global_batch(x, mesh, 16), jax.random.key(1))
  assert float(m["finite"]) == 1.0
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(state), before))


def test_batch_must_divide_over_devices(cache, tmp_path):
  with pytest.raises(ConfigError, match="train.batch_size"):
    train.train(tiny_config(batch_size=12), str(tmp_path / "w"), cache)


def test_sampler_is_a_pure_function_of_step(cache):
  s = slices_lib.SliceSampler(cache, cache.split("train"), 16, seed=3)
  a, b = s.pairs(5), slices_lib.SliceSampler(cache, cache.split("train"), 16, seed=3).pairs(5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  # One epoch visits every training pair exactly once.
  n = s.num_pairs // 16
  rows = np.concatenate([s.pairs(k)[0] * 100 + s.pairs(k)[1] for k in range(n)])
  assert len(np.unique(rows)) == len(rows) == n * 16
  assert set(np.unique(s.pairs(0)[0])) <= set(cache.rows(cache.split("train")))
  ordered = slices_lib.SliceSampler(cache, cache.split("train"), 16, seed=3, shuffle=False)
  r, sl = ordered.pairs(0)
  assert len(set(r.tolist())) == 1 and (np.diff(sl) == 1).all()


def test_training_writes_logs_images_and_reduces_loss(cache, tmp_path):
  workdir = str(tmp_path / "w")
  train.train(tiny_config(num_steps=30, log_every=10, eval_every=30), workdir, cache)
  rec = read_metrics(workdir)
  losses = [r["loss"] for r in rec if "loss" in r]
  assert losses[-1] < losses[0]
  assert any("val_loss" in r for r in rec) and all(r["slices_per_sec"] > 0 for r in rec
                                                    if "loss" in r)
  assert os.path.exists(os.path.join(workdir, "images", "train_0000030.png"))
  assert os.listdir(os.path.join(workdir, "tb"))
