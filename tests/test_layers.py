"""models/layers.py: flax's Conv + BatchNorm + LeakyReLU, with the fused training path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from slicevae_jax.models import layers


class _Flax(nn.Module):
  """The reference: flax's modules, as the models used them before."""
  features: int
  slopes: tuple = (0.2,)

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.features, (3, 3), padding=1)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    for s in self.slopes:
      x = nn.leaky_relu(x, s)
    return x


class _Ours(nn.Module):
  features: int
  slopes: tuple = (0.2,)

  @nn.compact
  def __call__(self, x, train):
    u, bias = layers.Conv(self.features)(x, add_bias=False)
    return layers.BatchNorm(momentum=0.9, epsilon=1e-5, slopes=self.slopes)(u, bias, not train)


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")


@pytest.mark.parametrize("slopes", [(0.2,), (), (0.04, 0.04), (0.0,)])
def test_same_variables_outputs_and_gradients_as_flax(slopes):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  ref, ours = _Flax(5, slopes), _Ours(5, slopes)
  v_ref, v = ref.init(jax.random.key(1), x, False), ours.init(jax.random.key(1), x, False)
  f_ref, f = _flat(v_ref), _flat(v)
  assert f_ref.keys() == f.keys()
  for k in f:
    np.testing.assert_array_equal(f[k], f_ref[k], err_msg=k)
  # A non-zero conv bias and non-trivial statistics, shared by both.
  v = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(a.size), a.shape), v)
  v = {"params": v["params"], "batch_stats": jax.tree.map(jnp.abs, v["batch_stats"])}

  np.testing.assert_allclose(ours.apply(v, x, False), ref.apply(v, x, False), rtol=0, atol=0)
  (y, s), (y_ref, s_ref) = (m.apply(v, x, True, mutable=["batch_stats"]) for m in (ours, ref))
  np.testing.assert_allclose(y, y_ref, atol=2e-5)
  for k, a in _flat(s).items():     # the running mean still includes the conv bias
    np.testing.assert_allclose(a, _flat(s_ref)[k], rtol=1e-5, atol=1e-6, err_msg=k)

  w = jax.random.normal(jax.random.key(7), y.shape)

  def grads(m):
    return _flat(jax.grad(lambda p: jnp.sum(w * m.apply(
        {"params": p, "batch_stats": v["batch_stats"]}, x, True, mutable=["batch_stats"])[0])
    )(v["params"]))
  g, g_ref = grads(ours), grads(ref)
  for k in g:
    if k == "Conv_0/bias":   # cancelled by the batch mean: exactly zero, rounding noise in flax
      assert np.all(g[k] == 0) and np.abs(g_ref[k]).max() < 1e-4 * np.abs(g_ref["BatchNorm_0/bias"]).max()
    else:
      np.testing.assert_allclose(g[k], g_ref[k], rtol=1e-4, atol=1e-4 * np.abs(g_ref[k]).max(),
                                 err_msg=k)


def test_bn_act_gradient_matches_autodiff_including_mean_and_var():
  u = jax.random.normal(jax.random.key(0), (3, 5, 4, 6)) * 2 + 1
  scale = jax.random.normal(jax.random.key(1), (6,))
  shift = jax.random.normal(jax.random.key(2), (6,))

  def reference(u, scale, shift):
    mean = u.mean((0, 1, 2))
    var = jnp.maximum(0.0, (u * u).mean((0, 1, 2)) - mean * mean)
    z = (u - mean) * jax.lax.rsqrt(var + 1e-5) * scale + shift
    return nn.leaky_relu(nn.leaky_relu(z, 0.3), 0.1), mean, var

  def loss(fn):
    def l(u, scale, shift):
      y, mean, var = fn(u, scale, shift)
      return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 2) + 3.0 * jnp.sum(var)
    return jax.grad(l, argnums=(0, 1, 2))(u, scale, shift)

  ours = lambda u, scale, shift: layers.bn_act(u, scale, shift, 1e-5, (0.3, 0.1))
  for a, b in zip(loss(ours), loss(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(ours(u, scale, shift), reference(u, scale, shift)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_keeps_the_compute_dtype_and_float32_statistics():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))

  class M(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      u, b = layers.Conv(5, dtype=jnp.bfloat16)(x, add_bias=False)
      return layers.BatchNorm(dtype=jnp.bfloat16)(u, b, not train)

  v = M().init(jax.random.key(1), x, False)
  y, s = M().apply(v, x, True, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16 and M().apply(v, x, False).dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(s))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v["params"]))
