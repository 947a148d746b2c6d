"""The convolution variants of models/conv.py compute XLA's convolution, values and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from slicevae_jax.models import conv
from slicevae_jax.models import slice_vae
from slicevae_jax.models import unet

DN = ("NHWC", "HWIO", "NHWC")


def _flax_kwargs(x, w):
  """The keyword arguments flax.linen.Conv passes to its conv_general_dilated."""
  return dict(lhs_dilation=(1, 1), rhs_dilation=(1, 1),
              dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, DN),
              feature_group_count=1, precision=None)


@pytest.mark.parametrize("impl,stride,size,c_in,c_out", [
    ("patches", 1, 16, 1, 8), ("patches", 2, 16, 8, 8),   # above SMALL_IMAGE 'small' is XLA's
    ("small", 1, 2, 32, 48), ("small", 2, 4, 16, 32),
    ("small", 1, 64, 4, 4), ("small", 2, 64, 4, 4), ("small", 1, 64, 1, 16),   # taps
    ("small", 1, 64, 8, 1), ("small", 1, 64, 16, 1), ("small", 2, 64, 8, 1)])   # outtaps
def test_conv_fn_matches_xla(impl, stride, size, c_in, c_out):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (3, size, size, c_in))
  w = jax.random.normal(kw, (3, 3, c_in, c_out))
  fn = conv.conv_fn(impl)
  pad = ((1, 1), (1, 1))

  def ours(x, w):
    return fn(x, w, (stride, stride), pad, **_flax_kwargs(x, w))

  def ref(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=DN)

  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-4, atol=1e-4)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(x, w)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", ["xla", "patches", "small"])
def test_upsample_conv_is_conv_of_upsampled(impl):
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (2, 4, 6, 8))   # non-square: rows and columns are separate
  w = jax.random.normal(kw, (3, 3, 8, 5))
  pad = ((1, 1), (1, 1))

  def ours(x, w):
    return conv.upsample_conv_fn(impl)(x, w, (1, 1), pad, **_flax_kwargs(x, w))

  def ref(x, w):
    return lax.conv_general_dilated(slice_vae._upsample2(x), w, (1, 1), pad,  # pylint: disable=protected-access
                                    dimension_numbers=DN)

  assert ours(x, w).shape == (2, 8, 12, 5)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-4, atol=1e-4)
  g_ours = jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2), (0, 1))(x, w)
  g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), (0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("size,c_in,c_out,stride,kind", [
    (64, 4, 4, 1, "taps"), (64, 1, 16, 1, "taps"), (64, 8, 8, 1, "xla"),
    (64, 8, 1, 1, "outtaps"), (64, 16, 1, 1, "outtaps"), (64, 16, 1, 2, "xla"),
    (64, 4, 1, 2, "taps"), (32, 4, 4, 1, "xla"), (32, 16, 1, 1, "xla")])
def test_small_picks_taps_or_outtaps_by_channels_and_size(size, c_in, c_out, stride, kind):
  x, w = jnp.zeros((2, size, size, c_in)), jnp.zeros((3, 3, c_in, c_out))
  jaxpr = str(jax.make_jaxpr(lambda x, w: conv.small_patches_conv(
      x, w, (stride, stride), ((1, 1), (1, 1)), **_flax_kwargs(x, w)))(x, w))
  forward = jaxpr.split("bwd=")[0]   # the custom_vjp's forward, or XLA's convolution
  got = ("xla" if "custom_vjp_call" not in jaxpr
         else "outtaps" if "dot_general" in forward else "taps")
  assert got == kind
  assert ("conv_general_dilated" in jaxpr.split("custom_vjp_call")[0]) == (kind == "xla")


def test_outtaps_refuses_strides():
  x, w = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 1))
  with pytest.raises(ValueError, match="stride 1 only"):
    conv.outtaps_conv(x, w, (2, 2), ((1, 1), (1, 1)), **_flax_kwargs(x, w))


@pytest.mark.parametrize("inner", [None, conv.small_patches_conv])
def test_merged_phase_convolutions_equal_separate_ones(inner):
  """upsample2_conv(merged=True), the CPU form: the same values and both gradients as the
  four separate phase convolutions, on a non-square image over SMALL_IMAGE."""
  x = jax.random.normal(jax.random.key(2), (3, 6, 9, 5))
  w = jax.random.normal(jax.random.key(3), (3, 3, 5, 7))
  kw = _flax_kwargs(x, w)
  up = lambda merged: lambda x, w: conv.upsample2_conv(x, w, (1, 1), ((1, 1), (1, 1)),
                                                       inner=inner, merged=merged, **kw)
  assert "custom_vjp_call" in str(jax.make_jaxpr(up(True))(x, w))
  assert up(True)(x, w).shape == (3, 12, 18, 7)
  np.testing.assert_allclose(up(True)(x, w), up(False)(x, w), rtol=1e-5, atol=1e-4)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for a, b in zip(jax.grad(loss(up(True)), (0, 1))(x, w), jax.grad(loss(up(False)), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # At most SMALL_IMAGE pixels a side the separate form runs, merged or not.
  small = x[:, :4, :4]
  assert "custom_vjp_call" not in str(jax.make_jaxpr(up(True))(small, w))


def test_outtaps_chunk_counts_bytes_of_the_dtype(monkeypatch):
  """outtaps_conv's chunks hold OUTTAPS_CHUNK_BYTES of its intermediate in the dtype it
  computes in: twice the images in bfloat16."""
  per_image = 9 * 7 * 3 * 3 * 2      # 9x7 images, 3x3 kernel, 2 outputs
  monkeypatch.setattr(conv, "OUTTAPS_CHUNK_BYTES", 4 * per_image * 4)
  assert conv._outtaps_chunk((64, 9, 7, 5), (3, 3, 5, 2), 4) == 4
  assert conv._outtaps_chunk((64, 9, 7, 5), (3, 3, 5, 2), 2) == 8
  assert conv._outtaps_chunk((6, 9, 7, 5), (3, 3, 5, 2), 2) == 6      # never above the batch
  # outtaps_conv's forward loops over 64 / 4 chunks in float32, 64 / 8 in bfloat16.
  w = jnp.ones((3, 3, 5, 2))
  for dtype, loops in ((jnp.float32, 16), (jnp.bfloat16, 8)):
    x = jnp.ones((64, 9, 7, 5), dtype)
    jaxpr = str(jax.make_jaxpr(lambda x, w: conv.outtaps_conv(
        x, w.astype(dtype), (1, 1), ((1, 1), (1, 1)), **_flax_kwargs(x, w)))(x, w))
    assert f"length={loops}" in jaxpr, (dtype, loops)
  monkeypatch.setattr(conv, "OUTTAPS_CHUNK_BYTES", 1)
  assert conv._outtaps_chunk((6, 9, 7, 5), (3, 3, 5, 2), 4) == 1      # at least one image


@pytest.mark.parametrize("name,chunk_attr,c_in,c_out", [
    ("taps_conv", "TAPS_CHUNK_BYTES", 3, 4), ("outtaps_conv", "OUTTAPS_CHUNK_BYTES", 6, 2)])
def test_few_channel_convs_with_phase_kernels_and_batches_in_chunks(monkeypatch, name,
                                                                    chunk_attr, c_in, c_out):
  # A 2x2 kernel with one-sided padding (the phase convolutions of the up path), and a
  # chunk size (four images' input for taps, four images' 4·C_out-wide intermediate for
  # outtaps) that leaves a remainder of the batch.
  per_image = 9 * 7 * 4 * (c_in if name == "taps_conv" else 4 * c_out)
  monkeypatch.setattr(conv, chunk_attr, 4 * per_image)
  # The kernel gradient in three chunks of two images.
  monkeypatch.setattr(conv, "KGRAD_CHUNK_BYTES", 2 * 4 * 9 * 7 * (c_in + c_out))
  x = jax.random.normal(jax.random.key(0), (6, 9, 7, c_in))
  w = jax.random.normal(jax.random.key(1), (2, 2, c_in, c_out))
  pad = ((1, 0), (0, 1))
  assert conv.kernel_grad_chunks(x.shape, (6, 9, 7, c_out)) == 3
  ours = lambda x, w: getattr(conv, name)(x, w, (1, 1), pad, **_flax_kwargs(x, w))
  ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.cos(f(x, w)))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_kernel_grad_chunks(monkeypatch):
  """About one chunk per KGRAD_CHUNK_BYTES of input and output gradient per device, at most
  KGRAD_MAX_CHUNKS, and a divisor of the batch per device; one when everything fits."""
  per_image = 4 * 2 * (8 * 8 * 4)                    # x and g of [8, 8, 4], float32
  monkeypatch.setattr(conv, "KGRAD_CHUNK_BYTES", 4 * per_image)   # 4 images a chunk
  chunks = lambda b, shards=1, itemsize=4: conv.kernel_grad_chunks(
      (b, 8, 8, 4), (b, 8, 8, 4), itemsize, shards)
  assert chunks(0) == 1 and chunks(1) == 1 and chunks(4) == 1
  assert chunks(16) == 4 and chunks(16, itemsize=2) == 2
  assert chunks(18) == 3                             # 5 wanted: 3 is 18's divisor below
  assert chunks(17) == 1                             # prime: no divisor to chunk by
  assert chunks(4096) == conv.KGRAD_MAX_CHUNKS
  # On 8 devices each device's part is chunked: 16 images a device, 4 chunks.
  assert chunks(128, shards=8) == 4 and chunks(32, shards=8) == 1
  assert chunks(36, shards=8) == chunks(36) == 9     # not divisible: as one device
  # By default, over the devices (8 in the tests).
  assert conv.kernel_grad_chunks((128, 8, 8, 4), (128, 8, 8, 4)) == 4


def _chunk_bytes_for(monkeypatch, per_image, images):
  monkeypatch.setattr(conv, "KGRAD_CHUNK_BYTES", int(images * per_image))


@pytest.mark.parametrize("stride,ksize,pad", [(1, 3, ((1, 1), (1, 1))), (2, 3, ((1, 1), (1, 1))),
                                              (1, 2, ((1, 0), (0, 1)))])
def test_xla_conv_kernel_gradient_in_chunks(monkeypatch, stride, ksize, pad):
  """xla_conv: XLA's values and both gradients, with the kernel gradient summed over three
  chunks of a batch of 6 (images 0, 3 / 1, 4 / 2, 5); a batch that fits is XLA's
  convolution without a custom gradient."""
  x = jax.random.normal(jax.random.key(0), (6, 10, 9, 5))
  w = jax.random.normal(jax.random.key(1), (ksize, ksize, 5, 6))
  out_hw = (10 + sum(pad[0]) - ksize) // stride + 1, (9 + sum(pad[1]) - ksize) // stride + 1
  per_image = 4 * (10 * 9 * 5 + out_hw[0] * out_hw[1] * 6)
  _chunk_bytes_for(monkeypatch, per_image, 1.5)      # 4 chunks wanted: 3 divides 6
  assert conv.kernel_grad_chunks(x.shape, (6, *out_hw, 6)) == 3
  ours = lambda x, w: conv.xla_conv(x, w, (stride, stride), pad, **_flax_kwargs(x, w))
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=DN)
  assert "custom_vjp_call" in str(jax.make_jaxpr(ours)(x, w))
  assert "custom_vjp_call" not in str(jax.make_jaxpr(ours)(x[:1], w))
  # A layout with the batch elsewhere than the first axis is not chunked.
  x_hnwc = x.transpose(1, 0, 2, 3)
  kw_hnwc = dict(_flax_kwargs(x, w), dimension_numbers=lax.conv_dimension_numbers(
      x_hnwc.shape, w.shape, ("HNWC", "HWIO", "NHWC")))
  hnwc = conv.xla_conv(x_hnwc, w, (stride, stride), pad, **kw_hnwc)
  assert "custom_vjp_call" not in str(jax.make_jaxpr(
      lambda a: conv.xla_conv(a, w, (stride, stride), pad, **kw_hnwc))(x_hnwc))
  np.testing.assert_allclose(hnwc, ref(x, w), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.cos(f(x, w)))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # In bfloat16 (2 chunks: half the bytes) the chunks' gradients are summed in float32 and
  # returned as the kernel's dtype.
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  assert conv.kernel_grad_chunks(xb.shape, (6, *out_hw, 6), 2) == 2
  gb = jax.grad(lambda w: jnp.sum(ours(xb, w).astype(jnp.float32)))(wb)
  gr = jax.grad(lambda w: jnp.sum(ref(x, w)))(w)
  assert gb.dtype == jnp.bfloat16
  np.testing.assert_allclose(gb.astype(jnp.float32), gr, rtol=3e-2,
                             atol=3e-2 * float(jnp.abs(gr).max()))


def test_xla_conv_chunks_stay_on_their_devices(monkeypatch):
  """With the batch sharded over the 8 test devices, each device's 4 images are cut into
  2 chunks: the same gradients as XLA's, and no image moves between devices."""
  assert jax.device_count() == 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.device_put(jax.random.normal(jax.random.key(0), (32, 12, 12, 3)), shard)
  w = jax.device_put(jax.random.normal(jax.random.key(1), (3, 3, 3, 4)), repl)
  _chunk_bytes_for(monkeypatch, 4 * 12 * 12 * (3 + 4), 2)
  assert conv.kernel_grad_chunks(x.shape, (32, 12, 12, 4)) == 2
  pad = ((1, 1), (1, 1))
  ours = lambda x, w: conv.xla_conv(x, w, (1, 1), pad, **_flax_kwargs(x, w))
  ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=DN)
  grad = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1)),
                           in_shardings=(shard, repl), out_shardings=(shard, repl))
  compiled = grad(ours).lower(x, w).compile().as_text()
  assert "all-to-all" not in compiled and "collective-permute" not in compiled
  assert "all-gather" not in compiled
  for a, b in zip(grad(ours)(x, w), grad(ref)(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_upsample_conv_rejects_other_convolutions():
  x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ValueError, match="3x3 kernels, stride 1"):
    conv.upsample2_conv(x, w, (2, 2), ((1, 1), (1, 1)))


def test_unknown_impl_is_refused():
  with pytest.raises(ValueError, match="unknown conv_impl"):
    conv.resolve("cudnn")


def test_slice_vae_same_function_under_every_impl(monkeypatch):
  """Same parameters (names, shapes, initial values) and the same outputs for each impl
  ('patches' is 'small' on every layer: its convolutions are checked above). With taps
  allowed on 16² images, 'small' runs the stem, the first down block and the output layers
  as taps."""
  monkeypatch.setattr(conv, "TAPS_MIN_IMAGE", 16)
  monkeypatch.setattr(conv, "KGRAD_CHUNK_BYTES", 8 << 10)   # kernel gradients in chunks
  x = jax.random.uniform(jax.random.key(2), (4, 16, 16, 1))
  models = {impl: slice_vae.SliceVAE(16, base_width=4, max_width=16, latent_channels=8,
                                     conv_impl=impl) for impl in ("xla", "small")}
  variables = {k: m.init({"params": jax.random.key(3)}, x[:1], jax.random.key(0), train=False)
               for k, m in models.items()}
  assert jax.tree.structure(variables["small"]) == jax.tree.structure(variables["xla"])
  for a, b in zip(jax.tree.leaves(variables["small"]), jax.tree.leaves(variables["xla"])):
    np.testing.assert_array_equal(a, b)
  outs = {k: jax.jit(functools.partial(m.apply, train=True, mutable=["batch_stats"]))(
      variables["xla"], x, jax.random.key(4)) for k, m in models.items()}
  (x_hat, mu, logvar), stats = outs["small"]
  (x_ref, mu_ref, lv_ref), stats_ref = outs["xla"]
  for a, b in ((x_hat, x_ref), (mu, mu_ref), (logvar, lv_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # 'small' runs ResDown's two stride-2 convolutions as one: the same at inference, with non-zero conv biases and running statistics, and the
  # same gradients.
  assert conv.fuse_siblings("small") and not conv.fuse_siblings("xla")
  shifted = {"params": jax.tree.map(lambda a: a + 0.05 * jnp.sin(jnp.arange(a.size) + 1.0)
                                    .reshape(a.shape), variables["xla"]["params"]),
             "batch_stats": stats_ref["batch_stats"]}
  evals = {k: jax.jit(functools.partial(m.apply, train=False))(shifted, x, jax.random.key(4))
           for k, m in models.items()}
  for a, b in zip(evals["small"], evals["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  def loss(params, model):
    (y, m_, lv), _ = model.apply({"params": params, "batch_stats": shifted["batch_stats"]}, x,
                                 jax.random.key(4), train=True, mutable=["batch_stats"])
    return jnp.sum((y - x) ** 2) + jnp.sum(m_ ** 2) + jnp.sum(jnp.exp(lv))
  grads = {k: jax.jit(jax.grad(loss), static_argnums=1)(shifted["params"], m)
           for k, m in models.items()}
  assert jax.tree.structure(grads["small"]) == jax.tree.structure(grads["xla"])
  for a, b in zip(jax.tree.leaves(grads["small"]), jax.tree.leaves(grads["xla"])):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(jnp.abs(b).max()) + 1e-6)


@pytest.mark.parametrize("impl", ["xla", "small"])
def test_resup_is_upsample_then_bn(impl):
  """ResUp computes BN and LReLU before the upsampling: the same as after it (train mode)."""
  block = slice_vae.ResUp(6, conv_impl=impl)
  x = jax.random.normal(jax.random.key(5), (3, 4, 4, 5))
  v = block.init(jax.random.key(6), x, False)
  p = v["params"]
  perturb = lambda t: jax.tree.map(lambda a: a + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), t)
  p = perturb(p)

  def conv(h, q):
    return lax.conv_general_dilated(h, q["kernel"], (1, 1), ((1, 1), (1, 1)),
                                    dimension_numbers=DN) + q["bias"]

  def bn(h, q):
    mean, var = jnp.mean(h, axis=(0, 1, 2)), jnp.var(h, axis=(0, 1, 2))
    return (h - mean) / jnp.sqrt(var + 1e-5) * q["scale"] + q["bias"]

  lrelu = lambda h: jnp.where(h > 0, h, 0.2 * h)
  up = slice_vae._upsample2  # pylint: disable=protected-access
  h = lrelu(bn(up(conv(x, p["Conv_0"])), p["BatchNorm_0"]))
  h = lrelu(bn(conv(h, p["ConvBN_0"]["Conv_0"]), p["ConvBN_0"]["BatchNorm_0"]))
  skip = lrelu(bn(up(conv(x, p["Conv_1"])), p["BatchNorm_1"]))
  out, _ = block.apply({"params": p, "batch_stats": v["batch_stats"]}, x, False,
                       mutable=["batch_stats"])
  np.testing.assert_allclose(out, h + skip, rtol=1e-4, atol=1e-4)


class _LiteralUNet(nn.Module):
  """unet.UNet's layers in their literal order: upsample with jnp.repeat, then convolve."""
  num_classes: int
  widths: tuple = (4, 8, 16)

  @nn.compact
  def __call__(self, x, train=False):
    skips, h = [], x
    for i, w in enumerate(self.widths):
      h = unet.DoubleConv(w)(h, train)
      if i < len(self.widths) - 1:
        skips.append(h)
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
    for w, skip in zip(reversed(self.widths[:-1]), reversed(skips)):
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = nn.Conv(w, (3, 3), padding=1)(h)
      h = unet.DoubleConv(w)(jnp.concatenate([h, skip], axis=-1), train)
    return nn.Conv(self.num_classes, (1, 1))(h)


def test_unet_up_path_is_upsample_then_conv():
  """The U-Net's phase-convolution up path: same parameter tree, same logits."""
  x = jax.random.normal(jax.random.key(7), (2, 16, 16, 1))
  model = unet.UNet(num_classes=3, widths=(4, 8, 16))
  v = model.init(jax.random.key(8), x)
  ref = _LiteralUNet(num_classes=3)
  assert jax.tree.structure(ref.init(jax.random.key(8), x)) == jax.tree.structure(v)
  v = jax.tree.map(lambda a: a + 0.1 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), v)
  for train in (False, True):
    got = model.apply(v, x, train, mutable=["batch_stats"])[0]
    want = ref.apply(v, x, train, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
