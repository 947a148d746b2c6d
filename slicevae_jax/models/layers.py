"""A 3x3 convolution and a BatchNorm fused with its LeakyReLU, for the conv -> BN -> act layers.

Same variables, names and initialisation as `flax.linen.Conv` (kernel, bias) and
`flax.linen.BatchNorm` (params scale, bias; batch_stats mean, var), so checkpoints and
parameter trees are unchanged; the same function in both modes. They differ in how a
training step (batch statistics) computes it:

* The convolution's bias is not added before a BatchNorm that normalises with the batch's
  own statistics: the batch mean absorbs it exactly, so the output does not depend on it.
  Its only effect is on the running mean, which gets the bias added to the batch mean of
  the bias-free output, as if it had been there. Its gradient is exactly zero (it was
  rounding noise before, which Adam's normalisation turned into a random walk of the
  bias, cancelled again by the batch mean).
* Normalisation, scale, shift and LeakyReLU are one function (`bn_act`) with a
  hand-written gradient: one fused pass for the two per-channel reductions and one for
  the input gradient, instead of the several passes autodiff of the separate
  operations gives. On a CPU these passes over the 16-channel 64² images are a large
  part of a step.

With running averages (inference) both compute exactly what flax's modules do.
"""

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def conv3x3(x: Array, kernel: Array, strides: int, fn: Callable | None = None) -> Array:
  """NHWC x HWIO 3x3 convolution, padding 1, through `fn` (a `conv_general_dilated`)."""
  fn = fn or lax.conv_general_dilated
  dn = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  return fn(x, kernel, (strides, strides), ((1, 1), (1, 1)), lhs_dilation=(1, 1),
            rhs_dilation=(1, 1), dimension_numbers=dn, feature_group_count=1, precision=None)


class Conv(nn.Module):
  """`flax.linen.Conv(features, (3, 3), strides, padding=1)`, with the bias add optional."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @nn.compact
  def __call__(self, x: Array, add_bias: bool = True, params_only: bool = False
               ) -> tuple[Array, Array]:
    """Returns (output, bias): the bias (in the compute dtype) is added iff add_bias.

    params_only: returns (kernel, bias) in the compute dtype instead, without convolving,
    for `sibling_convs`.
    """
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if params_only:
      return kernel, bias
    y = conv3x3(x, kernel, self.strides, self.conv_general_dilated)
    return (y + bias if add_bias else y), bias


def sibling_convs(x: Array, kernels: Sequence[Array], strides: int,
                  fn: Callable | None = None) -> list[Array]:
  """conv3x3(x, k) for each k, computed as one convolution by the kernels concatenated
  along their outputs, then split: the same values, one pass over x instead of one per
  kernel, one wider (more efficient) convolution, and one input gradient."""
  y = conv3x3(x, jnp.concatenate(list(kernels), axis=-1), strides, fn)
  ends = [0]
  for k in kernels:
    ends.append(ends[-1] + k.shape[-1])
  return [y[..., a:b] for a, b in zip(ends[:-1], ends[1:])]


def _act(z: Array, slopes: tuple[float, ...]) -> Array:
  for s in slopes:   # flax.linen.leaky_relu, once per slope
    z = jnp.where(z >= 0, z, s * z)
  return z


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bn_act(u: Array, scale: Array, shift: Array, eps: float, slopes: tuple[float, ...]
           ) -> tuple[Array, Array, Array]:
  """Training-mode BatchNorm of u [..., C] over all axes but the last, then LeakyReLU.

  Returns (y, mean, var): y = act((u - mean) * rsqrt(var + eps) * scale + shift) in u's
  dtype, with mean and (biased) variance in float32 as `flax.linen.BatchNorm` computes
  them (E[u²] - E[u]², clipped at 0). `slopes` are the negative slopes of LeakyReLUs
  applied in turn (() for none).
  """
  return _bn_act_fwd(u, scale, shift, eps, slopes)[0]


def _stats(u32: Array) -> tuple[Array, Array]:
  axes = tuple(range(u32.ndim - 1))
  mean = jnp.mean(u32, axes)
  var = jnp.maximum(0.0, jnp.mean(u32 * u32, axes) - mean * mean)
  return mean, var


def _bn_act_fwd(u, scale, shift, eps, slopes):
  u32 = u.astype(jnp.float32)
  mean, var = _stats(u32)
  rstd = lax.rsqrt(var + eps)
  z = (u32 - mean) * (rstd * scale) + shift
  y = _act(z, slopes).astype(u.dtype)
  return (y, mean, var), (u, mean, rstd, scale, shift)


def _bn_act_bwd(eps, slopes, res, cts):
  u, mean, rstd, scale, shift = res
  dy, dmean, dvar = cts
  axes = tuple(range(u.ndim - 1))
  n = u.size // u.shape[-1]
  u32 = u.astype(jnp.float32)
  xhat = (u32 - mean) * rstd
  z = xhat * scale + shift
  slope = 1.0
  for s in slopes:
    slope = slope * s
  dz = dy.astype(jnp.float32)
  if slopes:
    dz = jnp.where(z >= 0, dz, slope * dz)
  dshift = jnp.sum(dz, axes)
  dscale = jnp.sum(dz * xhat, axes)
  # d/du of the normalised output, plus the (normally zero) cotangents of mean and var.
  du = (scale * rstd) * (dz - dshift / n - xhat * (dscale / n))
  du = du + dmean / n + (2.0 / n) * dvar * (u32 - mean)
  return du.astype(u.dtype), dscale, dshift


bn_act.defvjp(_bn_act_fwd, _bn_act_bwd)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over all axes but the last, followed by LeakyReLU(s).

  Called as bn(u, conv_bias, use_running_average), where u is a convolution's output
  *without* its bias and conv_bias that bias: with running averages it normalises u +
  conv_bias exactly as flax does; with batch statistics the bias cancels, so u is
  normalised directly (`bn_act`) and the bias only enters the running mean.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  slopes: Sequence[float] = (0.2,)

  @nn.compact
  def __call__(self, u: Array, conv_bias: Array | None, use_running_average: bool) -> Array:
    c = u.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
    shift = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
    slopes = tuple(float(s) for s in self.slopes)
    if use_running_average:
      x = u if conv_bias is None else u + conv_bias
      y = (x - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + shift
      return _act(y.astype(self.dtype), slopes)
    y, mean, var = bn_act(u, scale, shift, self.epsilon, slopes)
    if not self.is_initializing():
      if conv_bias is not None:
        mean = mean + conv_bias.astype(jnp.float32)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)
