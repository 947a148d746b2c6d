"""2D U-Net segmenter for the Realistic Atlas Score: slices [B,H,W,1] -> logits [B,H,W,K].

Paper §3.3: a U-Net (Ronneberger et al.) trained on coronal slices of real
volumes with a Dice loss. Four resolution levels, two 3x3 conv + BatchNorm +
ReLU per level, max-pooling down, nearest x2 + conv up, skip concatenation.
The conv after each x2 upsampling reads the small image through four 2x2 phase
convolutions (models/conv.py, `upsample2_conv`): the same function of the same
parameters, without storing the upsampled image. With `features=True` the same
parameters give the bottleneck activations instead, which eval/segmenter.py pools for the segmenter Fréchet distance.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from slicevae_jax.models import conv as conv_lib
from slicevae_jax.models import layers

Array = jax.Array


class DoubleConv(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
      # flax.linen.BatchNorm + ReLU, fused (models/layers.py).
      x = layers.BatchNorm(momentum=0.9, dtype=self.dtype, slopes=(0.0,))(x, None, not train)
    return x


class UNet(nn.Module):
  """U-Net with `len(widths)` levels; H and W must divide by 2**(levels-1)."""
  num_classes: int
  widths: Sequence[int] = (16, 32, 64, 128)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False, features: bool = False) -> Array:
    """Slices [B, H, W, C] -> logits [B, H, W, K] (float32).

    features=True stops after the encoder and returns the bottleneck activations
    [B, H/2**(L-1), W/2**(L-1), widths[-1]] (float32). Submodules are created in the same
    order either way, so parameter names, and with them existing checkpoints, are unchanged.
    """
    skips = []
    h = x.astype(self.dtype)
    for i, w in enumerate(self.widths):
      h = DoubleConv(w, self.dtype)(h, train)
      if i < len(self.widths) - 1:
        skips.append(h)
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
    if features:
      return h.astype(jnp.float32)
    for w, skip in zip(reversed(self.widths[:-1]), reversed(skips)):
      # conv(upsample2(h)), computed as four phase convolutions of h.
      h = nn.Conv(w, (3, 3), padding=1, dtype=self.dtype,
                  conv_general_dilated=conv_lib.upsample_conv_fn("xla"))(h)
      h = DoubleConv(w, self.dtype)(jnp.concatenate([h, skip], axis=-1), train)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(h).astype(jnp.float32)
