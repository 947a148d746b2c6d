"""The 2D slice VAE: slices [B, H, W, 1] <-> latents [B, 2, 2, 256] (paper §2.1, §3.1).

A fully convolutional residual VAE with no dense layer. The encoder halves the
slice with ResDown blocks down to 4x4 and two parallel ResDown heads give the
posterior mean and log-variance at 2x2; the decoder mirrors it with ResUp
blocks and ends in a linear 1-channel convolution. Widths follow the released
reference (paper §3.1 lists its encoders): base width 16 / 8 / 4 at 64² / 128² /
256², doubling per stage up to 128, latent 2x2x256 = 1024 at every resolution,
about 3.3 M parameters.

BatchNorm at inference (`bn_mode`):
  'running'  running averages, the usual choice;
  'volume'   statistics of the batch at hand (a volume's stack of slices), as
             the reference effectively did since it never switched to eval mode.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slicevae_jax.models import conv as conv_lib
from slicevae_jax.models import layers

Array = jax.Array


class ConvBN(nn.Module):
  """3x3 conv (bias, padding 1) -> BatchNorm -> optional LeakyReLU(0.2).

  upsample=True convolves the nearest-x2 upsampled input without storing it
  (models/conv.py, `upsample2_conv`): same parameters, same function. The conv and the
  BatchNorm are models/layers.py's: flax's parameters, with the bias that batch
  statistics cancel left out of training steps and the normalisation and activation
  fused.
  """
  features: int
  strides: int = 1
  activate: bool = True
  momentum: float = 0.9
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  upsample: bool = False

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool, part: str = "all",
               bias: Array | None = None) -> Any:
    """part 'all': conv -> BN -> act of x. For a conv computed together with a sibling's
    (`layers.sibling_convs`): 'params' returns the conv's (kernel, bias) for input x;
    'bn' takes x as that conv's output without bias, and its `bias`, and runs the rest."""
    if part not in ("all", "params", "bn"):
      raise ValueError(f"ConvBN part must be 'all', 'params' or 'bn', got {part!r}")
    bn = lambda: layers.BatchNorm(momentum=self.momentum, epsilon=1e-5, dtype=self.dtype,
                                  slopes=(0.2,) if self.activate else ())
    if part == "bn":
      return bn()(x, bias, use_running_average)
    fn = (conv_lib.upsample_conv_fn(self.conv_impl) if self.upsample
          else conv_lib.conv_fn(self.conv_impl))
    conv = layers.Conv(self.features, strides=self.strides, dtype=self.dtype,
                       conv_general_dilated=fn)
    if part == "params":
      return conv(x, params_only=True)
    u, bias = conv(x, add_bias=False)
    return bn()(u, bias, use_running_average)


class ResDown(nn.Module):
  """Halves H and W. main: conv(s2) BN LReLU conv BN LReLU; skip: conv(s2) BN LReLU.

  On a CPU the two stride-2 convolutions of x run as one (`conv_lib.fuse_siblings`);
  parameters and function are the same.
  """
  features: int
  activate: bool = True
  momentum: float = 0.9
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool) -> Array:
    kw = dict(momentum=self.momentum, dtype=self.dtype, conv_impl=self.conv_impl)
    ra = use_running_average
    c_in = x.shape[-1]
    main1 = ConvBN(c_in, strides=2, **kw)
    main2 = ConvBN(self.features, activate=self.activate, **kw)
    skip_cb = ConvBN(self.features, strides=2, activate=self.activate, **kw)
    if conv_lib.fuse_siblings(self.conv_impl):
      # Both stride-2 convolutions read x: one convolution (`layers.sibling_convs`).
      (k1, b1), (ks, bs) = main1(x, ra, "params"), skip_cb(x, ra, "params")
      u1, us = layers.sibling_convs(x, [k1, ks], 2, conv_lib.conv_fn(self.conv_impl))
      return main2(main1(u1, ra, "bn", b1), ra) + skip_cb(us, ra, "bn", bs)
    return main2(main1(x, ra), ra) + skip_cb(x, ra)


def _upsample2(x: Array) -> Array:
  """Nearest-neighbour x2 on [B, H, W, C], as one broadcast and reshape."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class ResUp(nn.Module):
  """Doubles H and W.

  main: conv, x2, BN, LReLU, conv BN LReLU; skip: conv, x2, BN, LReLU. Nearest x2
  commutes with BatchNorm (a channel's mean and variance over the repeated image are
  those of the image itself) and with LReLU, so both run before the upsampling, on a
  quarter of the pixels; the main path's second conv reads the upsampled image through
  four 2x2 phase convolutions (`ConvBN(upsample=True)`), and the skip is upsampled only
  where it is added: the same function, computed with fewer operations and less memory.
  """
  features: int
  momentum: float = 0.9
  skip_double_lrelu: bool = False  # reference quirk: LReLU(0.04) twice on the skip
  dtype: Any = jnp.float32
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool) -> Array:
    conv = lambda c: layers.Conv(c, dtype=self.dtype,
                                 conv_general_dilated=conv_lib.conv_fn(self.conv_impl))
    bn = lambda slopes: layers.BatchNorm(momentum=self.momentum, epsilon=1e-5,
                                         dtype=self.dtype, slopes=slopes)
    c_in = x.shape[-1]
    ra = use_running_average
    conv0, conv1 = conv(c_in), conv(self.features)     # main path's first conv, skip's
    if ra and conv_lib.fuse_siblings(self.conv_impl):
      # At inference on a CPU the two convolutions of x run as one (decode 64³ and 128³,
      # one core: 3% faster). Training keeps them apart: there the fused form was 0.6-1.0x
      # as fast (bench/RESULTS.md).
      (k0, b0), (k1, b1) = conv0(x, params_only=True), conv1(x, params_only=True)
      u0, u1 = layers.sibling_convs(x, [k0, k1], 1, conv_lib.conv_fn(self.conv_impl))
    else:
      (u0, b0), (u1, b1) = conv0(x, add_bias=False), conv1(x, add_bias=False)
    h = bn((0.2,))(u0, b0, ra)
    h = ConvBN(self.features, momentum=self.momentum, dtype=self.dtype,
               conv_impl=self.conv_impl, upsample=True)(h, ra)
    skip_slopes = (0.04, 0.04) if self.skip_double_lrelu else (0.2,)
    skip = bn(skip_slopes)(u1, b1, ra)
    return h + _upsample2(skip)


def stage_widths(slice_size: int, base_width: int, max_width: int,
                 latent_size: int) -> list[int]:
  """Output channels of the encoder's ResDown stages before the heads.

  64² with base 16: [16, 32, 64, 128] (64 -> 4); 128² base 8: [8, ..., 128];
  256² base 4: [4, ..., 128].
  """
  widths, size = [], slice_size
  while size > 2 * latent_size:
    widths.append(min(base_width * 2 ** len(widths), max_width))
    size //= 2
  return widths


class SliceVAE(nn.Module):
  """Slice VAE for square slices of side `slice_size`.

  Methods:
    encode(x [B,H,W,1], train) -> (mu, logvar), each [B, 2, 2, 256]
    decode(z [B,2,2,256], train) -> x_hat [B,H,W,1], linear output
    __call__(x, key, train) -> (x_hat, mu, logvar), sampling z by reparameterisation
  `train=True` uses batch statistics and updates the running averages
  (apply with mutable=['batch_stats']); `train=False` follows `bn_mode`.
  """
  slice_size: int
  base_width: int = 16
  max_width: int = 128
  latent_channels: int = 256
  latent_size: int = 2
  bn_mode: str = "running"
  bn_momentum: float = 0.9
  skip_double_lrelu: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # models/conv.py: 'auto' | 'xla' | 'patches' | 'small'

  def setup(self):
    kw = dict(momentum=self.bn_momentum, dtype=self.dtype, conv_impl=self.conv_impl)
    widths = stage_widths(self.slice_size, self.base_width, self.max_width, self.latent_size)
    self.stem = ConvBN(self.base_width, **kw)
    self.down = [ResDown(w, **kw) for w in widths]
    self.mu_head = ResDown(self.latent_channels, activate=False, **kw)
    self.logvar_head = ResDown(self.latent_channels, activate=False, **kw)
    # Decoder mirrors the encoder: 256 -> widths reversed, then one more at base width.
    up_widths = list(reversed(widths)) + [self.base_width]
    self.up = [ResUp(w, skip_double_lrelu=self.skip_double_lrelu, **kw) for w in up_widths]
    self.out_block = ConvBN(self.base_width, **kw)
    self.out_conv = layers.Conv(1, dtype=self.dtype,
                                conv_general_dilated=conv_lib.conv_fn(self.conv_impl))

  def _running(self, train: bool) -> bool:
    return (not train) and self.bn_mode == "running"

  def encode(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    ra = self._running(train)
    h = self.stem(x.astype(self.dtype), ra)
    for block in self.down:
      h = block(h, ra)
    mu = self.mu_head(h, ra).astype(jnp.float32)
    logvar = self.logvar_head(h, ra).astype(jnp.float32)
    return mu, logvar

  def decode(self, z: Array, train: bool = False) -> Array:
    ra = self._running(train)
    h = z.astype(self.dtype)
    for block in self.up:
      h = block(h, ra)
    h = self.out_block(h, ra)
    return self.out_conv(h)[0].astype(jnp.float32)

  def __call__(self, x: Array, key: Array, train: bool = True) -> tuple[Array, Array, Array]:
    mu, logvar = self.encode(x, train)
    eps = jax.random.normal(key, mu.shape, mu.dtype)
    z = mu + jnp.exp(0.5 * logvar) * eps
    return self.decode(z, train), mu, logvar


def from_config(config) -> SliceVAE:
  """Builds the model of `config.model` for slices of `config.data.grid`."""
  m = config.model
  return SliceVAE(slice_size=int(config.data.grid), base_width=int(m.base_width),
                  max_width=int(m.max_width), latent_channels=int(m.latent_channels),
                  latent_size=int(m.latent_size), bn_mode=m.bn_mode,
                  bn_momentum=float(m.bn_momentum), skip_double_lrelu=bool(m.skip_double_lrelu),
                  dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
                  conv_impl=m.get("conv_impl", "auto"))


# At inference on a CPU ('small' convolutions) a batch runs as up to INFERENCE_CHUNKS
# independent chunks of at least MIN_INFERENCE_CHUNK slices: XLA runs them concurrently
# on its threads, and a chunk's activations stay in cache. Decode of one volume, 2 threads:
# 64³ 0.0553 -> 0.0395 s, 128³ 0.208 -> 0.185 s (bench/RESULTS.md).
INFERENCE_CHUNKS = 4
MIN_INFERENCE_CHUNK = 8


def inference_chunks(model: SliceVAE, batch: int) -> int:
  """How many independent chunks `apply_inference` splits a batch of `batch` into."""
  if model.bn_mode == "volume" or conv_lib.resolve(model.conv_impl) != "small":
    return 1
  return max(1, min(INFERENCE_CHUNKS, batch // MIN_INFERENCE_CHUNK))


def apply_inference(model: SliceVAE, variables, x: Array, method: str) -> Any:
  """Runs `model.encode` or `model.decode` at inference, honouring `bn_mode`.

  In 'volume' mode BatchNorm normalises with the statistics of `x` itself (the
  stack at hand); the running averages it would update are discarded. In 'running' mode
  every slice is computed on its own, so on a CPU the batch runs in chunks
  (`inference_chunks`): the same values.
  """
  fn = getattr(SliceVAE, method)
  if model.bn_mode == "volume":
    out, _ = model.apply(variables, x, False, method=fn, mutable=["batch_stats"])
    return out
  chunks = inference_chunks(model, x.shape[0])
  if chunks == 1:
    return model.apply(variables, x, False, method=fn)
  outs = [model.apply(variables, part, False, method=fn) for part in jnp.array_split(x, chunks)]
  return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs)
