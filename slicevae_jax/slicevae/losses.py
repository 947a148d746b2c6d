"""Slice VAE objective (paper §2.1, §3.1): summed squared error + β · summed KL, per slice."""

import jax
import jax.numpy as jnp

Array = jax.Array


def gaussian_kl(mu: Array, logvar: Array) -> Array:
  """KL(N(mu, exp(logvar)) || N(0, I)) summed over all but the batch axis -> [B].

  KL = -1/2 Σ (1 + log σ² − μ² − σ²).
  """
  kl = -0.5 * (1.0 + logvar - jnp.square(mu) - jnp.exp(logvar))
  return kl.reshape(kl.shape[0], -1).sum(axis=1)


def squared_error(x_hat: Array, x: Array) -> Array:
  """Σ over pixels of (x̂ − x)² -> [B]."""
  d = jnp.square(x_hat.astype(jnp.float32) - x.astype(jnp.float32))
  return d.reshape(d.shape[0], -1).sum(axis=1)


def vae_loss(x_hat: Array, x: Array, mu: Array, logvar: Array,
             kl_weight: float = 0.2) -> tuple[Array, dict[str, Array]]:
  """Negative β-ELBO per slice, averaged over the batch.

  L = mean_b [ Σ_pixels (x̂_b − x_b)² + β Σ_latent KL_b ],  β = 0.2 in the paper
  (a Gaussian likelihood up to scale; sums, not means, as in the reference).

  Args:
    x_hat, x: [B, H, W, 1]; mu, logvar: [B, h, w, C].
  Returns:
    (loss scalar, metrics dict of scalars).
  """
  rec = squared_error(x_hat, x)
  kl = gaussian_kl(mu, logvar)
  loss = jnp.mean(rec + kl_weight * kl)
  return loss, {"loss": loss, "recon": jnp.mean(rec), "kl": jnp.mean(kl)}
