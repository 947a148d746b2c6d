"""slicevae_jax: 3D brain MRI from a 2D slice VAE and a Gaussian over the slice direction.

Notebook entry points (imported on first use, so that light modules such as the
preprocessing workers never pull in JAX):

    from slicevae_jax import load_for_inference, sample_volumes
    from slicevae_jax import load_baseline   # a trained 3D baseline (baseline_stages)
    from slicevae_jax import score_volumes, complete_volume, interpolate_volumes  # density
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_for_inference": "slicevae_jax.inference",
    "sample_volumes": "slicevae_jax.inference",
    "sample_latents": "slicevae_jax.inference",
    "encode_stacks": "slicevae_jax.inference",
    "decode_latents": "slicevae_jax.inference",
    "InferenceBundle": "slicevae_jax.inference",
    "score_volumes": "slicevae_jax.density",
    "complete_volume": "slicevae_jax.density",
    "interpolate_volumes": "slicevae_jax.density",
    "memorisation_audit": "slicevae_jax.density",
    "run": "slicevae_jax.pipeline",
    "load_baseline": "slicevae_jax.baseline_stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'slicevae_jax' has no attribute {name!r}")
