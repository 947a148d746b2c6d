"""Shapes, parameter counts and basic behaviour of the 3D baseline models (gan3d, vae3d).

Full-size models (64³ and up, 512 channels) are only traced with jax.eval_shape;
real forward passes run at 16³ with a handful of channels.

Parameter counts at 64³, derived by hand from the reference layer sizes below
(k³·Cin·Cout [+ Cout bias]; BatchNorm: 2·C):
  Generator, linear input (WGAN-GP, VAE-GAN)   37,449,280
  Generator, deconv input (α-GAN, α-WGAN)      37,416,512
  Discriminator, 1 output (either head)        11,049,665
  α-(W)GAN encoder (Discriminator, 1000 out)   43,785,896
  VAE-GAN encoder                             149,344,912
  Code discriminator (BatchNorm1D / none)      20,901,889 / 20,885,505
  VAE3D (latent 512)                            1,659,553
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicevae_jax.errors import ConfigError
from slicevae_jax.models.gan3d import (CodeDiscriminator, Discriminator, Generator,
                                       VAEGANEncoder, stage_channels)
from slicevae_jax.models.vae3d import VAE3D, latent_size

KEY = jax.random.key(0)


def _conv(k, cin, cout, bias=True):
  return k ** 3 * cin * cout + (cout if bias else 0)


def _dense(cin, cout, bias=True):
  return cin * cout + (cout if bias else 0)


def _bn(c):
  return 2 * c


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_shapes(model, *args, **kw):
  return jax.eval_shape(lambda: model.init(KEY, *args, **kw))


def _vol(b, g):
  return jnp.zeros((b, g, g, g, 1))


def test_stage_channels():
  assert stage_channels(64) == [512, 256, 128, 64]
  assert stage_channels(128) == [512, 256, 128, 64, 32]
  assert stage_channels(256) == [512, 256, 128, 64, 32, 16]
  assert stage_channels(16) == [512, 256]
  assert stage_channels(64, max_channels=16, min_channels=4) == [16, 8, 4, 4]
  for bad in (4, 48, 100):
    with pytest.raises(ConfigError):
      stage_channels(bad)


# --- full size, eval_shape only ---------------------------------------------------------------

TRUNK_64 = (_conv(4, 1, 64) + _conv(4, 64, 128) + _bn(128) + _conv(4, 128, 256) + _bn(256)
            + _conv(4, 256, 512) + _bn(512))
GEN_TAIL_64 = (_bn(512) + _conv(3, 512, 256, False) + _bn(256) + _conv(3, 256, 128, False)
               + _bn(128) + _conv(3, 128, 64, False) + _bn(64) + _conv(3, 64, 1, False))
VAEGAN_HEAD = _dense(4 ** 3 * 512, 2048) + _bn(2048) + _dense(2048, 1000)
CODE_D = _dense(1000, 4096) + _bn(4096) + _dense(4096, 4096) + _bn(4096) + _dense(4096, 1)
RL16 = 3 * 2 * (_bn(8) + _conv(3, 8, 8, False))
VAE3D_64 = (_conv(3, 1, 16, False) + _bn(16) + 4 * RL16 + 2 * _dense(16 * 64, 512)
            + _dense(512, 16 * 64) + 4 * RL16 + _bn(16) + _conv(3, 16, 1))


def test_param_counts_64_match_reference_sizes():
  z = jnp.zeros((2, 1000))
  lin = _init_shapes(Generator(64, input_layer="linear"), z, train=False)
  dec = _init_shapes(Generator(64, input_layer="deconv"), z, train=False)
  assert _count(lin["params"]) == _dense(1000, 512 * 64) + GEN_TAIL_64 == 37_449_280
  assert _count(dec["params"]) == 1000 * 512 * 64 + GEN_TAIL_64 == 37_416_512
  for head in ("scalar", "map"):
    d = _init_shapes(Discriminator(64, head=head), _vol(2, 64), train=False)
    assert _count(d["params"]) == TRUNK_64 + _conv(4, 512, 1) == 11_049_665
  enc = _init_shapes(Discriminator(64, out_features=1000), _vol(2, 64), train=False)
  assert _count(enc["params"]) == TRUNK_64 + _conv(4, 512, 1000) == 43_785_896
  vg = _init_shapes(VAEGANEncoder(64), _vol(2, 64), train=False)
  assert _count(vg["params"]) == TRUNK_64 + 2 * VAEGAN_HEAD == 149_344_912
  cd = _init_shapes(CodeDiscriminator(), z, train=False)
  assert _count(cd["params"]) == CODE_D == 20_901_889
  cd0 = _init_shapes(CodeDiscriminator(norm="none"), z, train=False)
  assert _count(cd0["params"]) == CODE_D - 4 * 4096 == 20_885_505
  assert "batch_stats" not in cd0
  v = _init_shapes(VAE3D(64), _vol(2, 64), KEY)
  assert _count(v["params"]) == VAE3D_64 == 1_659_553


@pytest.mark.parametrize("grid", [64, 128])
def test_full_size_output_shapes(grid):
  z = jnp.zeros((2, 1000))
  x = _vol(2, grid)
  for il in ("linear", "deconv"):
    g = Generator(grid, input_layer=il)
    out = jax.eval_shape(lambda: g.init_with_output(KEY, z, train=False)[0])
    assert out.shape == (2, grid, grid, grid, 1) and out.dtype == jnp.float32
  for head in ("scalar", "map"):
    for n in (1, 1000):
      d = Discriminator(grid, head=head, out_features=n)
      out = jax.eval_shape(lambda: d.init_with_output(KEY, x, train=False)[0])
      assert out.shape == (2, n)
  d = Discriminator(grid)
  feats = jax.eval_shape(lambda: d.init_with_output(KEY, x, train=False, features=True)[0])
  assert feats.shape == (2, 4 ** 3 * 512)
  mu, logvar = jax.eval_shape(lambda: VAEGANEncoder(grid).init_with_output(KEY, x, train=False)[0])
  assert mu.shape == logvar.shape == (2, 1000)
  xh, mu, logvar = jax.eval_shape(lambda: VAE3D(grid).init_with_output(KEY, x, KEY)[0])
  assert xh.shape == x.shape
  assert mu.shape == logvar.shape == (2, latent_size(grid)) == (2, 512 * grid // 64)


def test_128_has_one_more_stage_than_64():
  def convs(tree):
    return sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
               if "kernel" in jax.tree_util.keystr(path))
  z = jnp.zeros((1, 1000))
  g64 = _init_shapes(Generator(64), z, train=False)["params"]
  g128 = _init_shapes(Generator(128), z, train=False)["params"]
  assert convs(g128) == convs(g64) + 1 == 6  # Dense + 4 convs at 64³
  # The new 128³ stage: 64 -> 32 channels, then 32 -> 1 instead of 64 -> 1.
  assert _count(g128) - _count(g64) == (_conv(3, 64, 32, False) + _bn(32) + _conv(3, 32, 1, False)
                                         - _conv(3, 64, 1, False))
  d64 = _init_shapes(Discriminator(64), _vol(1, 64), train=False)["params"]
  d128 = _init_shapes(Discriminator(128), _vol(1, 128), train=False)["params"]
  assert convs(d128["trunk"]) == convs(d64["trunk"]) + 1 == 5
  v64 = _init_shapes(VAE3D(64), _vol(1, 64), KEY)["params"]
  v128 = _init_shapes(VAE3D(128), _vol(1, 128), KEY)["params"]
  assert len(v128) == len(v64) + 2  # one more RL in the encoder and in the decoder
  assert "enc_rl4" in v128 and "enc_rl4" not in v64


# --- small real forward passes -----------------------------------------------------------------

SMALL = dict(max_channels=16, min_channels=4)


@pytest.mark.parametrize("input_layer", ["linear", "deconv"])
def test_generator_forward_small(input_layer):
  g = Generator(16, latent_dim=8, input_layer=input_layer, **SMALL)
  z = jax.random.normal(KEY, (3, 8))
  v = g.init(KEY, z, train=False)
  x, upd = g.apply(v, z, train=True, mutable=["batch_stats"])
  assert x.shape == (3, 16, 16, 16, 1) and x.dtype == jnp.float32
  assert bool(jnp.all(jnp.abs(x) < 1))
  assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(v["batch_stats"])
  assert g.apply(v, z, train=False).shape == x.shape


def test_discriminator_and_encoders_small():
  x = jax.random.uniform(KEY, (2, 16, 16, 16, 1), minval=-1, maxval=1)
  for head in ("scalar", "map"):
    d = Discriminator(16, head=head, out_features=5, **SMALL)
    v = d.init(KEY, x, train=False)
    out, _ = d.apply(v, x, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 5) and out.dtype == jnp.float32
    feats = d.apply(v, x, train=False, features=True)
    assert feats.shape == (2, 4 ** 3 * 16)
  # init through the feature path still creates the head.
  vf = Discriminator(16, **SMALL).init(KEY, x, train=False, features=True)
  assert "head" in vf["params"]
  e = VAEGANEncoder(16, latent_dim=6, hidden=12, **SMALL)
  v = e.init(KEY, x, train=False)
  (mu, logvar), _ = e.apply(v, x, train=True, mutable=["batch_stats"])
  assert mu.shape == logvar.shape == (2, 6)
  assert not np.allclose(mu, logvar)  # separate heads
  cd = CodeDiscriminator(hidden=16)
  z = jax.random.normal(KEY, (4, 6))
  v = cd.init(KEY, z, train=False)
  out, _ = cd.apply(v, z, train=True, mutable=["batch_stats"])
  assert out.shape == (4, 1)


def test_instance_norm_has_no_batch_stats_and_is_per_sample():
  z = jax.random.normal(KEY, (2, 8))
  g = Generator(16, latent_dim=8, norm="instance", **SMALL)
  v = g.init(KEY, z, train=True)
  assert set(v) == {"params"}
  both = g.apply(v, z, train=True)
  one = g.apply(v, z[:1], train=True)
  np.testing.assert_allclose(both[:1], one, atol=1e-5)
  d = Discriminator(16, norm="instance", **SMALL)
  assert set(d.init(KEY, both, train=True)) == {"params"}
  e = VAEGANEncoder(16, latent_dim=4, hidden=8, norm="instance", **SMALL)
  assert set(e.init(KEY, both, train=True)) == {"params"}
  assert set(CodeDiscriminator(hidden=8, norm="none").init(KEY, z, train=True)) == {"params"}


def test_bad_names_raise():
  z = jnp.zeros((1, 8))
  with pytest.raises(ConfigError):
    Generator(16, latent_dim=8, input_layer="conv", **SMALL).init(KEY, z, train=False)
  with pytest.raises(ConfigError):
    Generator(16, latent_dim=8, norm="layer", **SMALL).init(KEY, z, train=False)
  with pytest.raises(ConfigError):
    Discriminator(16, head="patch", **SMALL).init(KEY, _vol(1, 16), train=False)
  with pytest.raises(ConfigError):
    CodeDiscriminator(norm="instance").init(KEY, z, train=False)


def test_vae3d_small():
  x32 = _vol(2, 32)
  xh, mu, logvar = jax.eval_shape(lambda: VAE3D(32).init_with_output(KEY, x32, KEY)[0])
  assert xh.shape == x32.shape and mu.shape == logvar.shape == (2, 256)
  x = jax.random.uniform(KEY, (2, 16, 16, 16, 1), minval=-1, maxval=1)
  m = VAE3D(16)
  assert m.latent_size == latent_size(16) == 128 and latent_size(32, 10) == 10
  v = m.init(KEY, x, jax.random.key(1))
  (xh, mu, logvar), upd = m.apply(v, x, jax.random.key(2), train=True, mutable=["batch_stats"])
  assert xh.shape == x.shape and xh.dtype == jnp.float32
  assert mu.shape == logvar.shape == (2, 128)
  assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(v["batch_stats"])
  assert bool(jnp.all(jnp.abs(xh) < 1))
  out = m.apply(v, mu, train=False, method=VAE3D.decode)
  assert out.shape == x.shape
  mu2, _ = m.apply(v, x, train=False, method=VAE3D.encode)
  assert mu2.shape == mu.shape
  # remat only changes the backward pass: same parameter tree, same values.
  mr = VAE3D(16, remat=True)
  vr = mr.init(KEY, x, jax.random.key(1))
  assert jax.tree.structure(vr) == jax.tree.structure(v)
  np.testing.assert_allclose(mr.apply(v, mu, train=False, method=VAE3D.decode), out, atol=1e-6)


def test_bfloat16_compute_returns_float32():
  z = jax.random.normal(KEY, (2, 8))
  g = Generator(16, latent_dim=8, dtype=jnp.bfloat16, **SMALL)
  v = g.init(KEY, z, train=False)
  assert jax.tree.leaves(v["params"])[0].dtype == jnp.float32
  x = g.apply(v, z, train=False)
  assert x.dtype == jnp.float32
  d = Discriminator(16, dtype=jnp.bfloat16, **SMALL)
  assert d.apply(d.init(KEY, x, train=False), x, train=False).dtype == jnp.float32
  m = VAE3D(16, dtype=jnp.bfloat16)
  xh, mu, _ = m.apply(m.init(KEY, x, KEY), x, KEY)
  assert xh.dtype == mu.dtype == jnp.float32
