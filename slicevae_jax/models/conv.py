"""How the models' 3x3 convolutions are computed: XLA's convolution, patches and one matmul, or taps.

Both give the same function of the same parameters (`flax.linen.Conv`'s kernel [kh, kw,
C_in, C_out] and bias), up to float summation order, so a checkpoint trained with one loads
into the other. They differ in speed:

* 'xla': `lax.conv_general_dilated`, which on a GPU or TPU goes to the vendor's
  convolution library and is the right choice there.
* 'patches': the kh·kw shifted (strided) views of the padded input are concatenated along
  channels, [B, H', W', kh·kw·C_in], and multiplied by the kernel reshaped to
  [kh·kw·C_in, C_out]. Its gradients are two matmuls and a sum of shifted slices.
* 'small': 'patches' for images of at most SMALL_IMAGE pixels a side, 'xla' above. XLA's CPU
  convolutions of the tiny, wide layers (2x2 and 4x4 images of 128-256 channels: the
  latent heads and the first decoder block) ran at a few GFLOP/s and took over a third of a
  64² training step; as matmuls they are negligible. On large images XLA's convolution
  wins (the concatenated patches cost more memory traffic than they save), except for
  layers of very few channels (the 1-channel stems, the 4- and 8-channel layers and
  output convolutions at 128² and 256²), which run as `taps_conv`: a sum of shifted,
  scaled views, 2-18x faster there than XLA's CPU convolution.
* 'auto': 'small' when the default backend is a CPU, 'xla' otherwise.

In training on a CPU ('small'), the kernel gradients of the convolutions of large images
(XLA's, taps and outtaps alike) are XLA's kernel gradients of chunks of the batch, summed
(`chunked_kernel_grad`): XLA's CPU kernel gradient of a whole 64²-image batch ran at about a
third of its forward's speed, on one thread.

`conv_fn(impl)` returns the function to hand to `flax.linen.Conv(conv_general_dilated=...)`.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from slicevae_jax import config_lib

Array = jax.Array

CONV_IMPLS = config_lib.CONV_IMPLS   # ('auto', 'xla', 'patches', 'small')


def _check_supported(name: str, lhs: Array, rhs: Array, padding, lhs_dilation,
                     rhs_dilation, feature_group_count: int) -> None:
  """What the matmul and taps forms support: 2D, explicit padding, no dilation or groups."""
  if lhs.ndim != 4 or rhs.ndim != 4:
    raise ValueError(f"{name} is 2D only: lhs {lhs.shape}, rhs {rhs.shape}")
  if feature_group_count != 1 or any(d not in (None, 1, (1, 1)) for d in
                                     (lhs_dilation, rhs_dilation)):
    raise ValueError(f"{name} supports neither dilation nor feature groups")
  if isinstance(padding, str):
    raise ValueError(f"{name} needs explicit padding pairs, not " + repr(padding))


def _shifted_views(lhs: Array, kh: int, kw: int, window_strides, padding) -> list[Array]:
  """The kh·kw strided views of the padded NHWC lhs that a convolution's taps read, row-major."""
  sh, sw = window_strides
  (pt, pb), (pl, pr) = padding
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  b, h, w, c = x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  return [lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def patches_conv(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                 precision=None, preferred_element_type=None) -> Array:
  """`lax.conv_general_dilated` for NHWC inputs and HWIO kernels, as patches @ kernel.

  Supports what the models use: 2D, any kernel size and stride, explicit padding pairs,
  no dilation, one feature group.
  """
  _check_supported("patches_conv", lhs, rhs, padding, lhs_dilation, rhs_dilation,
                   feature_group_count)
  kh, kw, c_in, c_out = rhs.shape
  taps = _shifted_views(lhs, kh, kw, window_strides, padding)
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return lax.dot_general(patches, rhs.reshape(kh * kw * c_in, c_out),
                         (((3,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _taps_forward(lhs: Array, rhs: Array, window_strides, padding) -> Array:
  if lhs.ndim == 3:
    return _taps_forward(lhs[None], rhs, window_strides, padding)[0]
  kh, kw, c_in, c_out = rhs.shape
  weights = rhs.reshape(kh * kw, c_in, c_out)     # row-major taps, as _shifted_views
  out = None
  for t, tap in enumerate(_shifted_views(lhs, kh, kw, window_strides, padding)):
    for c in range(c_in):
      term = tap[..., c:c + 1] * weights[t, c]
      out = term if out is None else out + term
  return out


def _images_per_chunk(batch: int, per_image: int, budget: int) -> int:
  """Images in a chunk of a `lax.map` loop over a batch: as many as fit `budget` bytes at
  `per_image` bytes each, at least one and at most the batch."""
  return max(1, min(batch, budget // max(1, per_image)))


def _chunked_taps(x: Array, k: Array, strides, pads) -> Array:
  """`_taps_forward` in a loop over chunks of the batch: XLA then fuses neither the sum
  into its consumers nor the input's producers into the sum (either would be recomputed
  once per tap), and a chunk's input stays in cache."""
  chunk = _images_per_chunk(x.shape[0], x[0].size * x.dtype.itemsize, TAPS_CHUNK_BYTES)
  return lax.map(lambda xc: _taps_forward(xc, k, strides, pads), x, batch_size=chunk)


def taps_conv(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
              precision=None, preferred_element_type=None) -> Array:
  """`lax.conv_general_dilated` (NHWC, HWIO) as a sum of kh·kw·C_in scaled shifted views.

  For convolutions with very few input channels: one elementwise loop over the output
  reading the input from cache, where XLA's CPU convolution runs at a few GFLOP/s (a
  4->4 or 4->1 3x3 conv of 256² images: 4-10x faster measured on one core). The
  gradient is XLA's convolution gradient (a custom_vjp), so training keeps its backward
  pass and gains the forward. Same restrictions as `patches_conv`.
  """
  _check_supported("taps_conv", lhs, rhs, padding, lhs_dilation, rhs_dilation,
                   feature_group_count)
  strides, pads = tuple(window_strides), tuple(map(tuple, padding))
  return _with_xla_grads(lambda x, k: _chunked_taps(x, k, strides, pads), lhs, rhs, strides,
                         pads, precision, preferred_element_type)


def _with_xla_grads(forward: Callable, lhs: Array, rhs: Array, strides, pads, precision,
                    preferred_element_type) -> Array:
  """forward(lhs, rhs), a convolution computed another way, with the gradients of XLA's
  (`_few_channel_conv_grads`): the custom_vjp of `taps_conv` and `outtaps_conv`."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))

  def reference(x, k):
    return lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=dn,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)

  @jax.custom_vjp
  def conv(x, k):
    return forward(x, k).astype(jnp.result_type(x, k))

  conv.defvjp(lambda x, k: (conv(x, k), (x, k)),
              lambda res, g: _few_channel_conv_grads(res, g, strides, pads, reference))
  return conv(lhs, rhs)


def _few_channel_conv_grads(res, g, strides, pads, reference):
  """Gradients of `taps_conv` and `outtaps_conv`: the kernel's is XLA's, on chunks of the
  batch (`chunked_kernel_grad`); the input's is XLA's too unless it is itself a
  few-channel convolution (stride 1), run as taps."""
  x, k = res
  dk = chunked_kernel_grad(reference, x, k, g)
  kh, kw = k.shape[:2]
  if strides == (1, 1) and _use_taps(g, k.transpose(0, 1, 3, 2)):
    # The input gradient of a stride-1 convolution is the convolution of g with the
    # flipped, transposed kernel: as few channels, so taps again.
    (pt, pb), (pl, pr) = pads
    k_t = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
    dx = _chunked_taps(g, k_t, (1, 1), ((kh - 1 - pt, kh - 1 - pb),
                                        (kw - 1 - pl, kw - 1 - pr))).astype(x.dtype)
  else:
    dx = jax.vjp(lambda x_: reference(x_, k), x)[1](g)[0]
  return dx, dk


# XLA's CPU kernel gradient of a convolution of large images is slow (at 64², 16 channels,
# about a third of its forward's speed) and does not spread over the thread pool, so on a
# CPU it is computed on chunks of the batch of about KGRAD_CHUNK_BYTES of input and output
# gradient each (`kernel_grad_chunks`: at most KGRAD_MAX_CHUNKS, unrolled), and the chunks'
# gradients summed.
# Kernel gradient alone, batch 32, 2 threads, one / 4-8 chunks (ms): 16->16 at 64² 22 /
# 11-12; 16->16+16 stride 2 at 64² 12.0 / 5.7; 32->32 at 32² 16.9 / 6.0-6.4; 16->64 2x2 at
# 32² 12.3 / 4.2; batch 128, 16->16 at 64², 131 / 43 (16 chunks). Whole training step, 2
# threads, slices/s before / after: 64² batch 32 162 / 185, batch 128 135 / 167; 128² batch
# 32 82 / 87 (bench/RESULTS.md). Chunking the forward or the input gradient was slower
# (16->16 at 64²: 4.4 / 6.1-7.0 ms), and so were 1.5 MiB chunks in the whole step.
KGRAD_CHUNK_BYTES = 4 << 20
KGRAD_MAX_CHUNKS = 16


def kernel_grad_chunks(x_shape, g_shape, itemsize: int = 4, shards: int | None = None) -> int:
  """How many chunks of the batch `chunked_kernel_grad` splits an input of x_shape
  [B, ...] and an output gradient of g_shape into. The batch is taken to be split evenly
  over `shards` devices (by default the number of devices, when it divides B), and each
  device's part into chunks of about KGRAD_CHUNK_BYTES of input and output gradient, at
  most KGRAD_MAX_CHUNKS: their number is the largest divisor of the per-device batch not
  above that (so a chunk may be larger, and a prime batch stays whole). Every chunk then
  has the same number of images on each device, and none moves between devices. The
  default assumes the batch is sharded over all devices, as `parallel.make_mesh()` does; on
  a smaller mesh the result is the same, only possibly slower."""
  batch = x_shape[0]
  if shards is None:
    shards = jax.device_count()
  local = batch // shards if batch % shards == 0 else batch
  per_image = itemsize * (math.prod(x_shape[1:]) + math.prod(g_shape[1:]))
  target = max(1, min(KGRAD_MAX_CHUNKS, -(-local * per_image // KGRAD_CHUNK_BYTES)))
  return max((n for n in range(1, min(target, local) + 1) if local % n == 0), default=1)


def chunked_kernel_grad(reference: Callable, x: Array, k: Array, g: Array) -> Array:
  """The gradient of <g, reference(x, k)> with respect to k, as a sum over n chunks of the
  batch (`kernel_grad_chunks`), each chunk's gradient in the kernel's dtype and their sum
  in at least float32. Chunk j holds images j, j + n, j + 2n, ...: a batch split into
  contiguous blocks over devices gives each chunk the same number of images on every
  device."""
  n = kernel_grad_chunks(x.shape, g.shape, x.dtype.itemsize)
  if n == 1:
    return jax.vjp(lambda k_: reference(x, k_), k)[1](g)[0]
  xs = x.reshape(x.shape[0] // n, n, *x.shape[1:])
  gs = g.reshape(g.shape[0] // n, n, *g.shape[1:])
  acc = jnp.promote_types(k.dtype, jnp.float32)
  dk = None
  for j in range(n):
    d = jax.vjp(lambda k_: reference(xs[:, j], k_), k)[1](gs[:, j])[0].astype(acc)
    dk = d if dk is None else dk + d
  return dk.astype(k.dtype)


def xla_conv(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None,
             rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
             precision=None, preferred_element_type=None) -> Array:
  """XLA's `lax.conv_general_dilated` (NHWC, HWIO) with its kernel gradient computed on
  chunks of the batch (`chunked_kernel_grad`) when the batch is large enough to be split;
  the forward and the input gradient are XLA's. Dilated, grouped or implicitly padded
  convolutions, and layouts whose batch is not the first axis, are XLA's throughout."""
  kw = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
  plain = (lhs.ndim != 4 or rhs.ndim != 4 or isinstance(padding, str)
           or feature_group_count != 1
           or any(d not in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation)))
  if not plain:
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    plain = dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0
  if not plain:
    out_shape = jax.eval_shape(
        lambda a, b: lax.conv_general_dilated(a, b, window_strides, padding, **kw), lhs, rhs)
    plain = kernel_grad_chunks(lhs.shape, out_shape.shape, lhs.dtype.itemsize) == 1
  if plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)
  strides, pads = tuple(window_strides), tuple(map(tuple, padding))

  def reference(x, k):
    return lax.conv_general_dilated(x, k, strides, pads, **kw)

  @jax.custom_vjp
  def conv(x, k):
    return reference(x, k)

  def backward(res, g):
    x, k = res
    return jax.vjp(lambda x_: reference(x_, k), x)[1](g)[0], chunked_kernel_grad(
        reference, x, k, g)

  conv.defvjp(lambda x, k: (conv(x, k), (x, k)), backward)
  return conv(lhs, rhs)


def _outtaps_forward(lhs: Array, rhs: Array, padding) -> Array:
  """Stride-1 convolution as one matmul to kh·kw·C_out channels, then the sum of kh·kw
  shifted slices of those."""
  if lhs.ndim == 3:
    return _outtaps_forward(lhs[None], rhs, padding)[0]
  kh, kw, c_in, c_out = rhs.shape
  (pt, pb), (pl, pr) = padding
  t = lax.dot_general(lhs, rhs.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * c_out),
                      (((3,), (0,)), ((), ())))          # [B, H, W, kh·kw·C_out]
  t = jnp.pad(t, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  b, h, w, _ = t.shape
  ho, wo = h - kh + 1, w - kw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      q = (i * kw + j) * c_out
      term = lax.slice(t, (0, i, j, q), (b, i + ho, j + wo, q + c_out))
      out = term if out is None else out + term
  return out


def _outtaps_chunk(x_shape, k_shape, itemsize: int) -> int:
  """Images per chunk of `outtaps_conv`: its kh·kw·C_out-wide intermediate, in the
  computation's dtype, at most OUTTAPS_CHUNK_BYTES (at least one image)."""
  kh, kw, _, c_out = k_shape
  per_image = x_shape[1] * x_shape[2] * kh * kw * c_out * itemsize
  return _images_per_chunk(x_shape[0], per_image, OUTTAPS_CHUNK_BYTES)


def outtaps_conv(lhs: Array, rhs: Array, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                 precision=None, preferred_element_type=None) -> Array:
  """A stride-1 `lax.conv_general_dilated` (NHWC, HWIO) with very few output channels:
  one matmul of the input with the kernel to kh·kw·C_out channels, then the sum of kh·kw
  shifted slices of the result.

  For the 1-channel output convolutions, which XLA's CPU convolution runs at a few
  GFLOP/s (16->1 at 64², batch 64, one core: 10.3 ms, here 3.9). Runs in a loop over
  chunks of the batch (at most OUTTAPS_CHUNK_BYTES of the kh·kw-times wider
  intermediate). Gradients as `taps_conv`'s. Same restrictions as `patches_conv`, and
  stride 1.
  """
  _check_supported("outtaps_conv", lhs, rhs, padding, lhs_dilation, rhs_dilation,
                   feature_group_count)
  if tuple(window_strides) != (1, 1):
    raise ValueError(f"outtaps_conv is stride 1 only, got strides {tuple(window_strides)}")
  pads = tuple(map(tuple, padding))

  def forward(x, k):
    return lax.map(lambda xc: _outtaps_forward(xc, k, pads), x,
                   batch_size=_outtaps_chunk(x.shape, k.shape, jnp.result_type(x, k).itemsize))

  return _with_xla_grads(forward, lhs, rhs, (1, 1), pads, precision, preferred_element_type)


# Convolutions of images at least TAPS_MIN_IMAGE pixels a side, with at most TAPS_MAX_IN input
# channels and at most TAPS_MAX_PRODUCT input times output channels, run as taps on a CPU. Measured forward, one core (XLA / taps, ms):
# 1->4 at 256² 47 / 2.6; 4->4 at 256² 68 / 16; 4->1 57 / 6.0; 4->8 at 128² 44 / 16;
# 8->1 at 128² 18 / 9.1; 8->8 at 128² 26 / 25 (a tie: left to XLA); 16->1 at 64² 11 / 32.
# Below TAPS_MIN_IMAGE pixels a side the convolution is cheap either way, and the unrolled
# sum only costs compile time.
TAPS_MAX_IN = 8
TAPS_MAX_PRODUCT = 32
TAPS_MIN_IMAGE = 64
TAPS_CHUNK_BYTES = 1 << 20


# Stride-1 convolutions with at most OUTTAPS_MAX_OUT output channels, of images at least
# TAPS_MIN_IMAGE pixels a side, run as `outtaps_conv` on a CPU (before the taps rule). Measured
# in the whole decode, one core: 64³ 0.098 -> 0.093 s, 128³ 0.528 -> 0.466 s (bench/RESULTS.md).
OUTTAPS_MAX_OUT = 1
OUTTAPS_CHUNK_BYTES = 4 << 20


def _use_outtaps(lhs: Array, rhs: Array, window_strides) -> bool:
  return (rhs.shape[3] <= OUTTAPS_MAX_OUT and tuple(window_strides) == (1, 1)
          and min(lhs.shape[1:3]) >= TAPS_MIN_IMAGE)


def _use_taps(lhs: Array, rhs: Array) -> bool:
  c_in, c_out = rhs.shape[2], rhs.shape[3]
  return (min(lhs.shape[1:3]) >= TAPS_MIN_IMAGE and c_in <= TAPS_MAX_IN
          and c_in * c_out <= TAPS_MAX_PRODUCT)


# Largest image side (pixels) that 'small' computes as patches: the 2x2 and 4x4 layers.
# Measured at 64², batch 32, one core: thresholds 2, 4, 8 and 16 gave 0.47, 0.41, 0.43 and
# 0.48 CPU s per training step (XLA's convolution everywhere: 0.73).
SMALL_IMAGE = 4


def small_patches_conv(lhs: Array, rhs: Array, window_strides, padding, **kw) -> Array:
  """`patches_conv` for images of at most SMALL_IMAGE pixels a side, `outtaps_conv` for
  1-channel outputs and `taps_conv` for other layers of very few channels, XLA's
  otherwise."""
  if max(lhs.shape[1:3]) <= SMALL_IMAGE:
    return patches_conv(lhs, rhs, window_strides, padding, **kw)
  if _use_outtaps(lhs, rhs, window_strides):
    return outtaps_conv(lhs, rhs, window_strides, padding, **kw)
  if _use_taps(lhs, rhs):
    return taps_conv(lhs, rhs, window_strides, padding, **kw)
  return xla_conv(lhs, rhs, window_strides, padding, **kw)


def resolve(impl: str) -> str:
  """'auto' -> 'small' on a CPU backend, 'xla' elsewhere; others unchanged."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv_impl {impl!r}; expected one of {CONV_IMPLS}")
  if impl == "auto":
    return "small" if jax.default_backend() == "cpu" else "xla"
  return impl


def fuse_siblings(impl: str) -> bool:
  """Whether ResDown's two stride-2 convolutions of one input run as one, their kernels
  concatenated (`layers.sibling_convs`): on a CPU ('small'). Forward and both gradients,
  one core, batch 32, two convolutions / one: 16->16+16 at 64² 35.6 / 18.4 ms, 8->8+8 at
  128² 100 / 61 ms, 16->16+32 at 32² 4.5 / 3.9 ms. (Stride 1, as in ResUp, gained
  nothing or lost: 16->16+16 at 32² 10.9 / 11.2, 16->16+8 at 64² 49 / 81 ms.)"""
  return resolve(impl) == "small"


def conv_fn(impl: str) -> Callable | None:
  """The `conv_general_dilated` for flax.linen.Conv: None (XLA's own) or a patches variant."""
  r = resolve(impl)
  if r == "small":
    return small_patches_conv
  return patches_conv if r == "patches" else None


def _phase_kernels(rhs: Array) -> list[tuple[Array, tuple[int, int]]]:
  """A 3-tap axis of a kernel seen through nearest x2 upsampling: two 2-tap kernels.

  Output pixel 2i + a of conv3(upsample2(y)) reads y at i - 1, i, i (a = 0) or i, i, i + 1
  (a = 1), so phase 0 is the 2-tap kernel [w0, w1 + w2] on offsets (-1, 0), padded (1, 0),
  and phase 1 is [w0 + w1, w2] on offsets (0, 1), padded (0, 1). Returns, per phase, the
  kernel (axis 0 reduced to 2 taps) and its padding.
  """
  return [(jnp.stack([rhs[0], rhs[1] + rhs[2]]), (1, 0)),
          (jnp.stack([rhs[0] + rhs[1], rhs[2]]), (0, 1))]


def _phase_convs(lhs: Array, rhs: Array, inner: Callable, kw) -> list[list[Array]]:
  """The four 2x2 phase convolutions of `upsample2_conv`, [row phase][col phase], each
  [B, H, W, C_out]."""
  rows = []
  for k_row, pad_row in _phase_kernels(rhs):
    cols = []
    for k, pad_col in _phase_kernels(jnp.swapaxes(k_row, 0, 1)):
      cols.append(inner(lhs, jnp.swapaxes(k, 0, 1), (1, 1), (pad_row, pad_col), **kw))
    rows.append(cols)
  return rows


def _merged_phase_convs(lhs: Array, rhs: Array, inner: Callable, kw) -> list[list[Array]]:
  """`_phase_convs` as one convolution: the four 2x2 phase kernels concatenated along
  the outputs, over the input padded by 1 on every side ([B, H+1, W+1, 4·C_out]); phase
  (a, b) is the window starting at (a, b)."""
  kernels = [jnp.swapaxes(k, 0, 1) for k_row, _ in _phase_kernels(rhs)
             for k, _ in _phase_kernels(jnp.swapaxes(k_row, 0, 1))]
  padded = jnp.pad(lhs, ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel = jnp.concatenate(kernels, axis=-1)
  kw = dict(kw, dimension_numbers=lax.conv_dimension_numbers(
      padded.shape, kernel.shape, ("NHWC", "HWIO", "NHWC")))
  out = inner(padded, kernel, (1, 1), ((0, 0), (0, 0)), **kw)
  _, h, w, _ = lhs.shape
  c = rhs.shape[-1]
  return [[out[:, a:a + h, b:b + w, (2 * a + b) * c:(2 * a + b + 1) * c] for b in range(2)]
          for a in range(2)]


def _interleave(rows: list[list[Array]]) -> Array:
  """Output phases [a][b], each [B, H, W, C], as the [B, 2H, 2W, C] image whose pixel
  (2i + a, 2j + b) is phase (a, b)'s pixel (i, j)."""
  out = jnp.stack([jnp.stack(cols, axis=3) for cols in rows], axis=2)  # [B, H, 2, W, 2, C]
  b, h, _, w, _, c = out.shape
  return out.reshape(b, 2 * h, 2 * w, c)


def upsample2_conv(lhs: Array, rhs: Array, window_strides, padding, inner=None,
                   merged: bool = False, **kw) -> Array:
  """3x3 'same' convolution of the nearest-x2 upsampled lhs, without upsampling it.

  Equals conv(upsample2(lhs), rhs) (stride 1, padding 1) up to float summation order, as
  four 2x2 convolutions of lhs, one per output phase, interleaved: 4 instead of 9
  multiply-adds per output pixel and channel pair, and the upsampled input is never stored.
  `inner` computes the phase convolutions (XLA's by default).

  merged=True computes the four phases as one convolution with 4·C_out outputs
  (`_merged_phase_convs`) for images over SMALL_IMAGE pixels a side: on a CPU one wide
  convolution is faster than four narrow ones (decode 128³, one core, 0.466 -> 0.407 s).
  Its gradient is that of the four separate convolutions (a custom_vjp), which trained
  faster.
  """
  if rhs.shape[:2] != (3, 3) or tuple(window_strides) != (1, 1) or \
      tuple(map(tuple, padding)) != ((1, 1), (1, 1)):
    raise ValueError("upsample2_conv is for 3x3 kernels, stride 1, padding 1")
  inner = inner or lax.conv_general_dilated
  separate = lambda x, k: _interleave(_phase_convs(x, k, inner, kw))
  if not merged or max(lhs.shape[1:3]) <= SMALL_IMAGE:
    return separate(lhs, rhs)

  @jax.custom_vjp
  def conv(x, k):
    return _interleave(_merged_phase_convs(x, k, inner, kw))

  conv.defvjp(lambda x, k: (conv(x, k), (x, k)),
              lambda res, g: jax.vjp(separate, *res)[1](g))
  return conv(lhs, rhs)


def upsample_conv_fn(impl: str) -> Callable:
  """The `conv_general_dilated` for a flax.linen.Conv applied to an image before its
  nearest x2 upsampling: the module keeps its parameters, the upsampling is folded in.
  On a CPU ('small') the four phase convolutions run as one (`upsample2_conv`, merged)."""
  inner = conv_fn(impl) or lax.conv_general_dilated
  merged = resolve(impl) == "small"
  return lambda lhs, rhs, window_strides, padding, **kw: upsample2_conv(
      lhs, rhs, window_strides, padding, inner=inner, merged=merged, **kw)
