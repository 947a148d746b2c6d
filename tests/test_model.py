"""Slice VAE shapes and sizes at every resolution (paper §3.1, the released reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_config
from slicevae_jax.models import slice_vae
from slicevae_jax.slicevae import losses


def _abstract(model, size, batch=2):
  x = jnp.zeros((batch, size, size, 1))
  variables = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)}, x, jax.random.key(1), train=False))
  out = jax.eval_shape(
      lambda v: model.apply(v, x, jax.random.key(1), train=True, mutable=["batch_stats"]),
      variables)
  return variables, out


@pytest.mark.parametrize("grid", [64, 128, 256])
def test_paper_model_shapes_and_size(grid):
  config = load_config(f"hcp{grid}")
  model = slice_vae.from_config(config)
  variables, ((x_hat, mu, logvar), _) = _abstract(model, grid)
  assert x_hat.shape == (2, grid, grid, 1)
  assert mu.shape == logvar.shape == (2, 2, 2, 256)      # 1024 latents per slice
  n = sum(np.prod(a.shape) for a in jax.tree.leaves(variables["params"]))
  assert 3.2e6 < n < 3.4e6                                  # ≈3.3 M at every resolution
  # No dense layer anywhere: every kernel is a 3x3 convolution.
  kernels = [a.shape for p, a in jax.tree_util.tree_leaves_with_path(variables["params"])
             if "kernel" in jax.tree_util.keystr(p)]
  assert all(k[:2] == (3, 3) for k in kernels)


@pytest.mark.parametrize("grid,expected", [(64, [16, 32, 64, 128]),
                                           (128, [8, 16, 32, 64, 128]),
                                           (256, [4, 8, 16, 32, 64, 128])])
def test_stage_widths_follow_reference(grid, expected):
  base = load_config(f"hcp{grid}").model.base_width
  assert slice_vae.stage_widths(grid, base, 128, 2) == expected


def test_encode_decode_roundtrip_shapes_and_bn_modes():
  x = jax.random.uniform(jax.random.key(0), (6, 16, 16, 1))
  for bn_mode in ("running", "volume"):
    model = slice_vae.SliceVAE(slice_size=16, base_width=4, max_width=8, latent_channels=8,
                               bn_mode=bn_mode)
    v = model.init({"params": jax.random.key(0)}, x, jax.random.key(1), train=False)
    mu, logvar = slice_vae.apply_inference(model, v, x, "encode")
    assert mu.shape == (6, 2, 2, 8)
    y = slice_vae.apply_inference(model, v, mu, "decode")
    assert y.shape == x.shape
  # 'volume' mode normalises with the stack's own statistics: a slice's
  # encoding depends on its companions; 'running' mode does not.
  model = slice_vae.SliceVAE(slice_size=16, base_width=4, max_width=8, latent_channels=8,
                             bn_mode="volume")
  a = slice_vae.apply_inference(model, v, x, "encode")[0][:3]
  b = slice_vae.apply_inference(model, v, x[:3], "encode")[0]
  assert not np.allclose(a, b, atol=1e-5)
  model = model.clone(bn_mode="running")
  a = slice_vae.apply_inference(model, v, x, "encode")[0][:3]
  b = slice_vae.apply_inference(model, v, x[:3], "encode")[0]
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("impl", ["small", "xla"])
def test_inference_chunks_give_the_same_values(impl, monkeypatch):
  """On a CPU ('small') `apply_inference` runs a batch as independent chunks, uneven ones
  included (19 slices -> 5, 5, 5, 4); the values equal one batch's. 'volume' BatchNorm and
  'xla' convolutions keep one batch."""
  x = jax.random.uniform(jax.random.key(0), (19, 16, 16, 1))
  model = slice_vae.SliceVAE(slice_size=16, base_width=4, max_width=8, latent_channels=8,
                             conv_impl=impl)
  v = model.init({"params": jax.random.key(0)}, x[:2], jax.random.key(1), train=False)
  v = jax.tree.map(lambda a: a + 0.05 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), v)
  monkeypatch.setattr(slice_vae, "MIN_INFERENCE_CHUNK", 4)
  assert slice_vae.inference_chunks(model, 19) == (4 if impl == "small" else 1)
  assert slice_vae.inference_chunks(model, 7) == 1        # fewer than two chunks of 4
  assert slice_vae.inference_chunks(model.clone(bn_mode="volume"), 19) == 1
  chunked = jax.jit(lambda v, x: slice_vae.apply_inference(model, v, x, "encode"))(v, x)
  y = jax.jit(lambda v, z: slice_vae.apply_inference(model, v, z, "decode"))(v, chunked[0])
  monkeypatch.setattr(slice_vae, "INFERENCE_CHUNKS", 1)
  whole = jax.jit(lambda v, x: slice_vae.apply_inference(model, v, x, "encode"))(v, x)
  y_whole = jax.jit(lambda v, z: slice_vae.apply_inference(model, v, z, "decode"))(v, whole[0])
  for a, b in zip(chunked + (y,), whole + (y_whole,)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_loss_matches_formula():
  k = jax.random.split(jax.random.key(0), 4)
  x, xh = jax.random.uniform(k[0], (3, 8, 8, 1)), jax.random.uniform(k[1], (3, 8, 8, 1))
  mu, lv = jax.random.normal(k[2], (3, 2, 2, 4)), jax.random.normal(k[3], (3, 2, 2, 4))
  loss, m = losses.vae_loss(xh, x, mu, lv, kl_weight=0.2)
  x, xh, mu, lv = map(np.asarray, (x, xh, mu, lv))
  rec = ((xh - x) ** 2).sum(axis=(1, 2, 3))
  kl = (-0.5 * (1 + lv - mu ** 2 - np.exp(lv))).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(loss, np.mean(rec + 0.2 * kl), rtol=1e-5)
  np.testing.assert_allclose(m["kl"], kl.mean(), rtol=1e-5)
  assert float(losses.gaussian_kl(jnp.zeros((1, 4)), jnp.zeros((1, 4)))[0]) == 0.0
