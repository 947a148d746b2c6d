"""3D GAN baselines (Kwon et al. 2019; paper §3.1): latents [B, L] <-> volumes [B, X, Y, Z, 1].

The volumetric models the slice VAE is compared against: 3D WGAN-GP, 3D VAE-GAN,
3D α-GAN and 3D α-WGAN. They share four building blocks, defined here; losses
and train steps live in baselines/steps.py.

  Generator            z [B, L] -> x [B, G, G, G, 1] in (-1, 1)
  Discriminator        x -> [B, out_features] raw scores (critic, GAN logit, or
                       the α-(W)GAN encoder's 1000-d code)
  VAEGANEncoder        x -> (mu, logvar), each [B, L]
  CodeDiscriminator    z [B, L] -> [B, 1] raw score

Sizes follow the released 64³ reference: generator 512 -> 256 -> 128 -> 64 -> 1
channels from 4³ up, discriminator trunk 64 -> 128 -> 256 -> 512 from 64³ down
to 4³. Larger grids get one more stage per doubling (paper: "we increase the
number of layers"); the channel of the new, finest stage keeps halving
(`stage_channels`), so 128³ adds a 32-channel stage and 256³ a 16-channel one.

`norm`: 'batch' (BatchNorm, torch momentum 0.1, running stats in 'batch_stats'),
'instance' (InstanceNorm without affine parameters, the torch InstanceNorm3d
default, as in the paper's 256³ α-GAN) or 'none'. Layers after which the
reference has no norm stay without one whatever `norm` says.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from slicevae_jax.errors import ConfigError

Array = jax.Array

NORMS = ("batch", "instance", "none")


def stage_channels(grid: int, max_channels: int = 512, min_channels: int = 8) -> list[int]:
  """Feature channels at resolutions 4, 8, 16, ..., grid/2 (log2(grid) - 2 entries).

  64³ with 512: [512, 256, 128, 64]; 128³: [512, 256, 128, 64, 32]. The
  generator walks the list forwards (then a final 1-channel conv at grid), the
  discriminator trunk backwards.
  """
  if grid < 8 or grid & (grid - 1):
    raise ConfigError(f"grid must be a power of two >= 8, got {grid}")
  n = grid.bit_length() - 3  # log2(grid) - 2
  return [max(max_channels >> i, min_channels) for i in range(n)]


def make_norm(kind: str, train: bool, dtype: Any) -> Callable[[Array], Array]:
  """A fresh normalisation layer of `kind` (call inside a compact method)."""
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
  if kind == "instance":
    # No running statistics and no affine parameters, like torch's InstanceNorm3d defaults.
    return nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False, dtype=dtype)
  if kind == "none":
    return lambda x: x
  raise ConfigError(f"unknown norm {kind!r}; expected one of {NORMS}")


def upsample2(x: Array) -> Array:
  """Nearest-neighbour x2 on the three spatial axes of [B, X, Y, Z, C]."""
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


class Generator(nn.Module):
  """z [B, latent_dim] -> volume [B, grid, grid, grid, 1] in (-1, 1), float32.

  input_layer:
    'linear'  Dense(latent -> C0·4³) with bias, reshaped to 4³ (WGAN-GP, VAE-GAN);
    'deconv'  ConvTranspose k4 without bias on the latent as a 1³ map (α-GAN, α-WGAN).
  Both are followed by norm + ReLU, as in the reference. Then per stage: nearest
  x2, Conv k3 p1 without bias, norm, ReLU; the last conv outputs 1 channel and
  goes through tanh only.
  """
  grid: int
  latent_dim: int = 1000
  max_channels: int = 512
  min_channels: int = 8
  input_layer: str = "linear"
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array, train: bool) -> Array:
    chans = stage_channels(self.grid, self.max_channels, self.min_channels)
    b = z.shape[0]
    h = z.reshape(b, self.latent_dim).astype(self.dtype)
    if self.input_layer == "linear":
      h = nn.Dense(chans[0] * 4 ** 3, dtype=self.dtype)(h).reshape(b, 4, 4, 4, chans[0])
    elif self.input_layer == "deconv":
      h = nn.ConvTranspose(chans[0], (4, 4, 4), padding="VALID", use_bias=False,
                           dtype=self.dtype)(h.reshape(b, 1, 1, 1, self.latent_dim))
    else:
      raise ConfigError(f"unknown input_layer {self.input_layer!r}; expected 'linear' or 'deconv'")
    h = nn.relu(make_norm(self.norm, train, self.dtype)(h))
    for c in chans[1:]:
      h = nn.Conv(c, (3, 3, 3), padding=1, use_bias=False, dtype=self.dtype)(upsample2(h))
      h = nn.relu(make_norm(self.norm, train, self.dtype)(h))
    h = nn.Conv(1, (3, 3, 3), padding=1, use_bias=False, dtype=self.dtype)(upsample2(h))
    return jnp.tanh(h.astype(jnp.float32))


class Trunk(nn.Module):
  """Discriminator trunk: volume [B, G, G, G, 1] -> features [B, 4, 4, 4, C_max], float32.

  One Conv k4 s2 p1 (with bias) per halving from grid down to 4³, channels
  `stage_channels` reversed; norm on all but the first; LeakyReLU(0.2).
  """
  grid: int
  max_channels: int = 512
  min_channels: int = 8
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if x.shape[1:4] != (self.grid,) * 3:
      raise ConfigError(f"expected volumes [B, {self.grid}, {self.grid}, {self.grid}, C], "
                        f"got shape {x.shape}")
    h = x.astype(self.dtype)
    for i, c in enumerate(reversed(stage_channels(self.grid, self.max_channels,
                                                  self.min_channels))):
      h = nn.Conv(c, (4, 4, 4), strides=2, padding=1, dtype=self.dtype)(h)
      if i > 0:
        h = make_norm(self.norm, train, self.dtype)(h)
      h = nn.leaky_relu(h, 0.2)
    return h.astype(jnp.float32)


class Discriminator(nn.Module):
  """volume [B, G, G, G, 1] -> raw scores [B, out_features], float32 (no sigmoid).

  head:
    'scalar'  Conv k4 valid on the 4³ trunk map -> 1³ (VAE-GAN, α-GAN, α-WGAN,
              and with out_features=1000 the α-(W)GAN encoder);
    'map'     Conv k4 s2 p1 -> 2³ map, averaged over space (WGAN-GP critic).
  `features=True` returns the flattened trunk output [B, 4³·C_max] instead; the
  head's parameters are still created at init either way.
  """
  grid: int
  max_channels: int = 512
  min_channels: int = 8
  head: str = "scalar"
  out_features: int = 1
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool, features: bool = False) -> Array:
    h = Trunk(self.grid, self.max_channels, self.min_channels, self.norm, self.dtype,
              name="trunk")(x, train)
    if features and not self.is_initializing():
      return h.reshape(h.shape[0], -1)
    if self.head == "scalar":
      conv = nn.Conv(self.out_features, (4, 4, 4), padding="VALID", dtype=self.dtype, name="head")
    elif self.head == "map":
      conv = nn.Conv(self.out_features, (4, 4, 4), strides=2, padding=1, dtype=self.dtype,
                     name="head")
    else:
      raise ConfigError(f"unknown head {self.head!r}; expected 'scalar' or 'map'")
    out = conv(h.astype(self.dtype)).astype(jnp.float32)
    if features:  # init with features=True: the head above only created its parameters
      return h.reshape(h.shape[0], -1)
    return out.mean(axis=(1, 2, 3))


class VAEGANEncoder(nn.Module):
  """volume [B, G, G, G, 1] -> (mu, logvar), each [B, latent_dim], float32.

  Trunk -> flatten (64³: 4³·512 = 32768) -> two heads, each
  Dense(hidden) norm ReLU Dense(latent_dim). The heads' norm is BatchNorm1D for
  norm='batch' and absent otherwise (the paper's 256³ variant drops BatchNorm1D).
  """
  grid: int
  latent_dim: int = 1000
  hidden: int = 2048
  max_channels: int = 512
  min_channels: int = 8
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> tuple[Array, Array]:
    h = Trunk(self.grid, self.max_channels, self.min_channels, self.norm, self.dtype,
              name="trunk")(x, train)
    h = h.reshape(h.shape[0], -1).astype(self.dtype)
    head_norm = "batch" if self.norm == "batch" else "none"
    outs = []
    for name in ("mu", "logvar"):
      y = nn.Dense(self.hidden, dtype=self.dtype, name=f"{name}_hidden")(h)
      y = nn.relu(make_norm(head_norm, train, self.dtype)(y))
      outs.append(nn.Dense(self.latent_dim, dtype=self.dtype, name=f"{name}_out")(y)
                  .astype(jnp.float32))
    return outs[0], outs[1]


class CodeDiscriminator(nn.Module):
  """Latent code z [B, L] -> raw score [B, 1], float32 (α-GAN, α-WGAN).

  Dense(hidden) norm LReLU(0.2), Dense(hidden) norm LReLU(0.2), Dense(1).
  norm: 'batch' (BatchNorm1D) or 'none' (the paper's 256³ α-GAN).
  """
  hidden: int = 4096
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array, train: bool) -> Array:
    if self.norm not in ("batch", "none"):
      raise ConfigError(f"CodeDiscriminator norm must be 'batch' or 'none', got {self.norm!r}")
    h = z.astype(self.dtype)
    for _ in range(2):
      h = nn.Dense(self.hidden, dtype=self.dtype)(h)
      h = nn.leaky_relu(make_norm(self.norm, train, self.dtype)(h), 0.2)
    return nn.Dense(1, dtype=self.dtype)(h).astype(jnp.float32)
