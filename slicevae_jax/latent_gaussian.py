"""Latent model, old import path (README's `slicevae_jax.latent_gaussian`): slicevae/latent.py."""

from slicevae_jax.slicevae.latent import (FORMAT_VERSION, MODELS, LatentGaussian,
                                          conditional_mean, conditional_sample, covariance,
                                          explained_variance, fit, from_latent, load,
                                          log_density, sample, save, to_latent)

__all__ = ["FORMAT_VERSION", "LatentGaussian", "MODELS", "conditional_mean", "conditional_sample",
           "covariance", "explained_variance", "fit", "from_latent", "load", "log_density",
           "sample", "save", "to_latent"]
