"""The paper's own 3D VAE baseline (§3.1): volumes [B, G, G, G, 1] <-> latents [B, L].

Encoder and decoder are symmetric, built from reversible layers (RL, Gomez et
al. 2017) at a constant 16 channels, with fully connected heads for the
posterior mean and log-variance:

  encoder  Conv_16 - BN - LR - MP - k×(RL - MP) - RL - FC_L (mu), FC_L (logvar)
  decoder  FC_{16·4³} - reshape 4³ - (k+1)×(RL - up×2) - BN - LR - Conv_1 - tanh

with k = log2(G) - 3, so the encoder pools G -> 4³ (64³: k = 3; 128³: k = 4)
and the flattened code before the heads is 16·4³ = 1024 at every grid. The
decoder mirrors the encoder layer for layer (its closing BN - LR - Conv_1
mirrors the opening Conv_16 - BN - LR) and ends in tanh, since volumes live in
[-1, 1]. Latent size L (`latent_size`): 512·G/64 unless given, i.e. FC_512 at
64³ and FC_1024 at 128³ as in the paper, 2048 at 256³.

The paper's 128³ string has no RL between the last MP and the FC; we keep the
64³ pattern (a trailing RL) at every grid so that one rule covers them all.

Reversible layer, "RL with 3 conv_16": a sequence of three additive coupling
blocks on the 16-channel map, each one a reversible stand-in for one 16-channel
3³ conv. A block splits the channels into halves x1, x2 (8 each) and computes
  y1 = x1 + F(x2),  y2 = x2 + G(y1),  output concat(y1, y2),
with F and G each BN -> LeakyReLU(0.2) -> Conv 3³ 8->8 without bias: the
pre-activation residual function of the partially reversible U-Net (Brügger et
al. 2019), with the paper's BN and LR in place of its GroupNorm and default
LeakyReLU. The two half-width convs of a block together cost as
much as one dense 16->16 conv, hence "conv_16". We do not implement the
inverse-based backward pass; `remat=True` recomputes each block's activations
in the backward pass instead, which gives the same memory saving in JAX.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from slicevae_jax.errors import ConfigError
from slicevae_jax.models.gan3d import upsample2

Array = jax.Array


def latent_size(grid: int, latent_dim: int = 0) -> int:
  """The VAE3D latent size: `latent_dim`, or 512·grid/64 when it is 0 (64³: 512, 128³: 1024)."""
  return latent_dim if latent_dim > 0 else 512 * grid // 64


def _bn(train: bool, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


class Residual(nn.Module):
  """F or G of a coupling block: BN -> LeakyReLU(0.2) -> Conv 3³ (no bias), channels kept."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    h = nn.leaky_relu(_bn(train, self.dtype)(x), 0.2)
    return nn.Conv(x.shape[-1], (3, 3, 3), padding=1, use_bias=False, dtype=self.dtype)(h)


class RevBlock(nn.Module):
  """Additive coupling on [B, X, Y, Z, C] (C even): y1 = x1 + F(x2), y2 = x2 + G(y1)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    y1 = x1 + Residual(self.dtype, name="f")(x2, train)
    y2 = x2 + Residual(self.dtype, name="g")(y1, train)
    return jnp.concatenate([y1, y2], axis=-1)


class ReversibleLayer(nn.Module):
  """RL: `depth` RevBlocks in sequence; [B, X, Y, Z, C] -> same shape."""
  depth: int = 3
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    # static_argnums counts the module as argument 0, so `train` (a Python bool) is 2.
    block = nn.remat(RevBlock, static_argnums=(2,)) if self.remat else RevBlock
    for i in range(self.depth):
      x = block(self.dtype, name=f"block{i}")(x, train)
    return x


class VAE3D(nn.Module):
  """3D VAE for cubic volumes of side `grid` (a power of two >= 8).

  Methods:
    encode(x [B,G,G,G,1], train) -> (mu, logvar), each [B, L] float32
    decode(z [B,L], train) -> x_hat [B,G,G,G,1] in (-1, 1), float32
    __call__(x, key, train) -> (x_hat, mu, logvar), z = mu + exp(logvar/2)·eps, eps ~ N(0, I)
  with L = latent_size(grid, latent_dim). `train=True` uses batch statistics and
  updates the running averages (apply with mutable=['batch_stats']).
  """
  grid: int
  latent_dim: int = 0
  channels: int = 16
  remat: bool = False
  dtype: Any = jnp.float32

  @property
  def latent_size(self) -> int:
    return latent_size(self.grid, self.latent_dim)

  def setup(self):
    if self.grid < 8 or self.grid & (self.grid - 1):
      raise ConfigError(f"VAE3D grid must be a power of two >= 8, got {self.grid}")
    if self.channels % 2:
      raise ConfigError(f"VAE3D channels must be even (RL splits them), got {self.channels}")
    n_rl = self.grid.bit_length() - 3  # log2(grid) - 2 RLs each way: k = n_rl - 1 RL-MP + 1 RL
    rl = lambda name: ReversibleLayer(remat=self.remat, dtype=self.dtype, name=name)
    self.stem = nn.Conv(self.channels, (3, 3, 3), padding=1, use_bias=False, dtype=self.dtype)
    self.stem_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    self.enc_rl = [rl(f"enc_rl{i}") for i in range(n_rl)]
    self.mu_head = nn.Dense(self.latent_size, dtype=self.dtype)
    self.logvar_head = nn.Dense(self.latent_size, dtype=self.dtype)
    self.dec_fc = nn.Dense(self.channels * 4 ** 3, dtype=self.dtype)
    self.dec_rl = [rl(f"dec_rl{i}") for i in range(n_rl)]
    self.out_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    self.out_conv = nn.Conv(1, (3, 3, 3), padding=1, dtype=self.dtype)

  def encode(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    if x.shape[1:4] != (self.grid,) * 3:
      raise ConfigError(f"expected volumes [B, {self.grid}, {self.grid}, {self.grid}, 1], "
                        f"got shape {x.shape}")
    pool = lambda h: nn.max_pool(h, (2, 2, 2), strides=(2, 2, 2))
    h = self.stem(x.astype(self.dtype))
    h = pool(nn.leaky_relu(self.stem_bn(h, use_running_average=not train), 0.2))
    for i, layer in enumerate(self.enc_rl):
      h = layer(h, train)
      if i < len(self.enc_rl) - 1:  # the last RL sits at 4³, straight before the FC heads
        h = pool(h)
    h = h.reshape(h.shape[0], -1)
    return (self.mu_head(h).astype(jnp.float32),
            self.logvar_head(h).astype(jnp.float32))

  def decode(self, z: Array, train: bool = False) -> Array:
    h = self.dec_fc(z.astype(self.dtype)).reshape(z.shape[0], 4, 4, 4, self.channels)
    for layer in self.dec_rl:
      h = upsample2(layer(h, train))
    h = nn.leaky_relu(self.out_bn(h, use_running_average=not train), 0.2)
    return jnp.tanh(self.out_conv(h).astype(jnp.float32))

  def __call__(self, x: Array, key: Array, train: bool = False) -> tuple[Array, Array, Array]:
    mu, logvar = self.encode(x, train)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape, mu.dtype)
    return self.decode(z, train), mu, logvar
