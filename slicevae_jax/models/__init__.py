"""Flax Linen networks: the slice VAE, the 3D baselines and the RAS U-Net."""
