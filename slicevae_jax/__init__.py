"""slicevae_jax: 3D brain MRI from a 2D slice VAE and a Gaussian over the slice direction."""

__version__ = "0.1.0"
