"""The slice VAE family (paper §2.1): losses, training, latent model and fit, inference, sampling."""
