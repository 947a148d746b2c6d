"""3D baselines: gradient penalties, one training iteration per model, guard, determinism."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from slicevae_jax import config_lib
from slicevae_jax.baselines import losses, stages, steps
from helpers import blob_volume

GRID = 16
BATCH = 2

def tiny_config(model: str, **baseline) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.model_type = model
  c.data.grid = GRID
  c.train.batch_size = BATCH
  c.train.learning_rate = 2e-4
  c.baseline.update(latent_dim=8, max_channels=16, min_channels=4, code_hidden=16,
                    encoder_hidden=16, vae3d_channels=4, vae3d_latent=8)
  for k, v in baseline.items():
    c.baseline[k] = v
  return config_lib.validate(c)


@functools.lru_cache(maxsize=None)
def _setup(model: str, overrides: tuple = ()):
  """(baseline, initial state, jitted step), built once per model and settings.

  The state comes from the default settings (none of the overrides changes the
  networks). Its key is an 'rbg' key: XLA compiles the initialisers' threefry
  draws several times slower on a CPU, and any key is valid.
  """
  bl = stages.build(tiny_config(model, **dict(overrides)))
  if overrides:
    return bl, _setup(model)[1], jax.jit(bl.step)
  return bl, jax.jit(bl.init)(jax.random.key(0, impl="rbg")), jax.jit(bl.step)


def _batch() -> jax.Array:
  rng = np.random.default_rng(0)
  vols = np.stack([blob_volume(GRID, rng) for _ in range(BATCH)])[..., None]
  return jnp.asarray(vols * 2.0 - 1.0)


def _equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b)))


def _changed(a, b) -> float:
  return float(sum(jnp.sum(jnp.abs(u - v)) for u, v in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b))))


EXPECTED_METRICS = {
    "wgan_gp": {"loss", "g_loss", "d_loss", "gp", "wasserstein"},
    "vae_gan": {"loss", "d_loss", "dec_loss", "enc_loss", "recon", "kl"},
    "alpha_gan": {"loss", "recon", "g_adv", "e_code", "d_loss", "cd_loss"},
    "alpha_wgan": {"loss", "recon", "g_adv", "e_code", "d_loss", "gp", "cd_loss", "cd_gp"},
    "vae3d": {"loss", "recon", "kl"},
}


# ---- gradient penalties -----------------------------------------------------

def test_interpolate_one_epsilon_per_sample():
  ones, zeros = jnp.ones((5, 3, 3, 3, 1)), jnp.zeros((5, 3, 3, 3, 1))
  x = losses.interpolate(ones, zeros, jax.random.key(1))
  eps = x[:, 0, 0, 0, 0]
  np.testing.assert_allclose(x, jnp.broadcast_to(eps[:, None, None, None, None], x.shape))
  assert bool(jnp.all((eps >= 0) & (eps <= 1))) and len(set(np.asarray(eps).tolist())) == 5


def test_gradient_penalty_linear_critic_is_exact():
  w = jax.random.normal(jax.random.key(2), (1, 4, 4, 4, 1)) * 0.3
  critic = lambda v: jnp.sum(v * w, axis=(1, 2, 3, 4))[:, None]   # ∇_x D = w everywhere
  real = jax.random.normal(jax.random.key(3), (3, 4, 4, 4, 1))
  fake = jax.random.normal(jax.random.key(4), (3, 4, 4, 4, 1))
  key = jax.random.key(5)
  per_sample = losses.gradient_penalty(critic, real, fake, key)
  per_voxel = losses.gradient_penalty(critic, real, fake, key, per_voxel=True)
  np.testing.assert_allclose(per_sample, (jnp.linalg.norm(w) - 1.0) ** 2, rtol=1e-5)
  np.testing.assert_allclose(per_voxel, jnp.mean((jnp.abs(w) - 1.0) ** 2), rtol=1e-5)
  assert abs(float(per_sample) - float(per_voxel)) > 1e-2


def test_gradient_penalty_nonlinear_critic_matches_autodiff():
  k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
  a = jax.random.normal(k1, (4, 4, 4, 2))
  b = jax.random.normal(k2, (4, 4, 4, 2))

  def one(v):  # one sample [4, 4, 4, 2] -> scalar
    return jnp.sum(jnp.tanh(a * v) * b) + 0.1 * jnp.sum(v ** 3)

  critic = lambda v: jax.vmap(one)(v)[:, None]
  real = jax.random.normal(k3, (3, 4, 4, 4, 2))
  # real == fake: the interpolate is `real` whatever ε, so the gradient is known.
  g = jax.vmap(jax.jacrev(one))(real)
  want_sample = jnp.mean((jnp.sqrt(jnp.sum(g ** 2, axis=(1, 2, 3, 4))) - 1.0) ** 2)
  want_voxel = jnp.mean((jnp.sqrt(jnp.sum(g ** 2, axis=-1)) - 1.0) ** 2)
  got_sample = losses.gradient_penalty(critic, real, real, jax.random.key(7))
  got_voxel = losses.gradient_penalty(critic, real, real, jax.random.key(7), per_voxel=True)
  np.testing.assert_allclose(got_sample, want_sample, rtol=1e-5)
  np.testing.assert_allclose(got_voxel, want_voxel, rtol=1e-5)
  assert abs(float(got_sample) - float(got_voxel)) > 1e-2


def test_code_gradient_penalty_per_sample():
  w = jnp.array([[0.3], [-0.4], [1.2]])                          # CD(z) = z·w, ‖w‖ = 1.3
  critic = lambda z: z @ w
  z_hat = jax.random.normal(jax.random.key(8), (4, 3))
  z = jax.random.normal(jax.random.key(9), (4, 3))
  np.testing.assert_allclose(losses.code_gradient_penalty(critic, z_hat, z, jax.random.key(0)),
                             0.3 ** 2, rtol=1e-5)


# ---- config helpers ------------------------------------------------------------

def test_resolved_norm_and_default_schedule():
  c = tiny_config("alpha_gan")
  assert stages.resolved_norm(c) == ("batch", "batch")
  c.data.grid = 256
  assert stages.resolved_norm(c) == ("instance", "none")
  c.model_type = "alpha_wgan"
  assert stages.resolved_norm(c) == ("batch", "batch")
  c.baseline.norm = "instance"
  assert stages.resolved_norm(c) == ("instance", "none")
  assert stages.updates_per_iteration(tiny_config("wgan_gp")) == (1, 5)
  assert stages.updates_per_iteration(tiny_config("alpha_wgan")) == (1, 1)
  assert stages.updates_per_iteration(tiny_config("wgan_gp", n_critic=2)) == (2, 5)


# ---- one training iteration per model ---------------------------------------------

@pytest.mark.parametrize("model", steps.MODELS)
def test_step_updates_every_network(model):
  bl, state, step = _setup(model)
  x = _batch()
  key = jax.random.key(11)
  new, metrics = step(state, x, key)
  metrics = jax.device_get(metrics)
  assert int(new.step) == 1
  assert metrics["finite"] == 1.0
  assert EXPECTED_METRICS[model] <= set(metrics), sorted(metrics)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  for name in bl.nets:
    assert _changed(state.params[name], new.params[name]) > 0, name
    if state.batch_stats[name]:
      assert _changed(state.batch_stats[name], new.batch_stats[name]) > 0, name
  # Determinism: same state, batch and key give the same new state and metrics.
  again, metrics2 = step(state, x, key)
  assert _equal(new, again) and _equal(metrics, jax.device_get(metrics2))
  # Inference helpers.
  z = bl.sample_latent(jax.random.key(12), BATCH)
  assert z.shape == (BATCH, bl.latent_dim)
  assert bl.generate(new, z).shape == (BATCH, GRID, GRID, GRID, 1)
  rec = bl.reconstruct(new, x)
  assert (rec is None) == (model == "wgan_gp")
  if rec is not None:
    assert rec.shape == x.shape and bool(jnp.all(jnp.isfinite(rec)))


@pytest.mark.parametrize("model", ["wgan_gp", "alpha_wgan", "vae3d"])
def test_non_finite_batch_changes_nothing(model):
  _, state, step = _setup(model)
  bad = _batch().at[0, 3, 3, 3, 0].set(jnp.nan)
  new, metrics = step(state, bad, jax.random.key(13))
  assert float(metrics["finite"]) == 0.0
  assert int(new.step) == 1
  assert _equal(new.replace(step=state.step), state)


def test_code_critic_switch_changes_only_the_code_critic():
  _, state, step_fixed = _setup("alpha_wgan")
  _, _, step_ref = _setup("alpha_wgan", (("code_critic_grad_from_zhat", False),))
  x, key = _batch(), jax.random.key(14)
  a, ma = step_fixed(state, x, key)
  b, mb = step_ref(state, x, key)
  # The code critic is the last update of the iteration: everything before it agrees.
  for name in ("E", "G", "D"):
    assert _equal(a.params[name], b.params[name]), name
  assert _changed(a.params["CD"], b.params["CD"]) > 0
  # Same loss value either way; only its gradient differs.
  np.testing.assert_allclose(ma["cd_loss"], mb["cd_loss"], rtol=1e-6)


@pytest.mark.parametrize("overrides", [
    dict(dtype="bfloat16"),
    dict(n_critic=2, n_gen=2, double_g_step=True),
    dict(norm="instance"),
], ids=["bfloat16", "repeated_updates", "instance_norm"])
def test_every_model_traces_with_its_options(overrides):
  """Shapes and dtypes only (no compile): the state's structure survives one step."""
  x = jax.ShapeDtypeStruct((BATCH, GRID, GRID, GRID, 1), jnp.float32)
  for model in steps.MODELS:
    bl = stages.build(tiny_config(model, **overrides))
    state = jax.eval_shape(bl.init, jax.random.key(0))
    new, metrics = jax.eval_shape(bl.step, state, x, jax.random.key(1))
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, state, new)
    assert all(jax.tree.leaves(same)), model
    assert EXPECTED_METRICS[model] | {"finite"} <= set(metrics), model
    if overrides.get("norm") == "instance" and model != "vae3d":
      assert not any(jax.tree.leaves(state.batch_stats)), model
