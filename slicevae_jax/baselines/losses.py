"""3D baseline losses: network outputs -> the terms of each update (paper §3.1; Kwon et al.).

Pure functions of arrays; `steps.py` combines them into each model's update schedule.
BCE, L1 and MSE follow torch's losses the reference used; the gradient penalty is
Gulrajani et al.'s, with the reference's per-voxel norm behind a switch.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from slicevae_jax.slicevae import losses as vae_losses

Array = jax.Array

_GP_EPS = 1e-12  # inside the square root: a finite derivative where a gradient is exactly 0


def bce(logits: Array, target: float) -> Array:
  """mean_b BCE(σ(logits_b), target) = mean_b −[t log σ(l) + (1−t) log(1−σ(l))]; logits [B, 1]."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def l1(x_hat: Array, x: Array) -> Array:
  """Mean absolute error over batch and voxels, mean |x̂ − x| (torch L1Loss)."""
  return jnp.mean(jnp.abs(x_hat.astype(jnp.float32) - x.astype(jnp.float32)))


def mse(x_hat: Array, x: Array) -> Array:
  """Mean squared error over batch and voxels, mean (x̂ − x)² (the VAE-GAN's rec_loss)."""
  return jnp.mean(jnp.square(x_hat.astype(jnp.float32) - x.astype(jnp.float32)))


def mean_kl(mu: Array, logvar: Array) -> Array:
  """KL(N(μ, σ²) ‖ N(0, I)) averaged over batch *and* latent entries; mu, logvar [B, L].

  = Σ_{b,l} −½(1 + log σ² − μ² − σ²) / (B·L), the VAE-GAN encoder's prior term.
  """
  kl = vae_losses.gaussian_kl(mu.astype(jnp.float32), logvar.astype(jnp.float32))
  return jnp.mean(kl) / (mu.size // mu.shape[0])


def interpolate(real: Array, fake: Array, key: Array) -> Array:
  """x̃ = ε·real + (1−ε)·fake with one ε ~ U(0, 1) per sample (broadcast over the rest)."""
  shape = (real.shape[0],) + (1,) * (real.ndim - 1)
  eps = jax.random.uniform(key, shape, jnp.float32)
  return eps * real.astype(jnp.float32) + (1.0 - eps) * fake.astype(jnp.float32)


def gradient_penalty(critic_fn: Callable[[Array], Array], real: Array, fake: Array,
                     key: Array, per_voxel: bool = False) -> Array:
  """WGAN-GP penalty (Gulrajani et al. 2017), unweighted.

  x̃ = ε x + (1−ε) x_fake, ε ~ U(0,1) per sample (`interpolate`); g = ∇_x̃ Σ_b D(x̃)_b
  (the per-sample gradients, coupled only through BatchNorm, as in the reference).

  per_voxel=False:  GP = mean_b (‖g_b‖₂ − 1)², the norm over all entries of sample b.
  per_voxel=True:   GP = mean_{b,v} (‖g_{b,v,:}‖₂ − 1)², the norm over the channel
                    (last) axis only, i.e. |g| per voxel for one channel — the
                    reference WGAN-GP's `gradients.norm(2, dim=1)` on [B, C, X, Y, Z].
  For codes [B, L] the two coincide (the channel axis is the whole sample).

  Args:
    critic_fn: batch -> [B, 1] raw critic values.
    real, fake: [B, ...] of the same shape; both are treated as constants.
    key: for ε.
  Returns:
    scalar float32.
  """
  x = jax.lax.stop_gradient(interpolate(real, fake, key))
  g = jax.grad(lambda v: jnp.sum(critic_fn(v).astype(jnp.float32)))(x)
  if per_voxel:
    norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=-1) + _GP_EPS)
  else:
    norm = jnp.sqrt(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) + _GP_EPS)
  return jnp.mean(jnp.square(norm - 1.0))


def code_gradient_penalty(critic_fn: Callable[[Array], Array], z_hat: Array, z: Array,
                          key: Array) -> Array:
  """α-WGAN code-space penalty GP(ẑ, z) = mean_b (‖∇_z̃ CD(z̃)_b‖₂ − 1)², z̃ = ε ẑ + (1−ε) z.

  z_hat, z: [B, L] encoder codes and prior samples; critic_fn: [B, L] -> [B, 1].
  """
  return gradient_penalty(critic_fn, z_hat, z, key, per_voxel=False)
