"""slicevae_jax: 3D brain MRI from a 2D slice VAE and a Gaussian over the slice direction.

The package in data-flow order (README, "Layout"): data/ (NIfTI -> cache), models/,
slicevae/ and baselines/ (the model families), trainer.py (the one loop), eval/ and
metrics/ (samples -> scores -> report); pipeline.py runs the stages, main.py is the
command line.

Notebook entry points (imported on first use, so that light modules such as the
preprocessing workers never pull in JAX; listed by tab completion):

    from slicevae_jax import load_for_inference, sample_volumes
    from slicevae_jax import load_baseline   # a trained 3D baseline (baselines/stages.py)
    from slicevae_jax import score_volumes, complete_volume, interpolate_volumes  # density
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_for_inference": "slicevae_jax.slicevae.inference",
    "sample_volumes": "slicevae_jax.slicevae.inference",
    "sample_latents": "slicevae_jax.slicevae.inference",
    "encode_stacks": "slicevae_jax.slicevae.inference",
    "decode_latents": "slicevae_jax.slicevae.inference",
    "InferenceBundle": "slicevae_jax.slicevae.inference",
    "score_volumes": "slicevae_jax.slicevae.density",
    "complete_volume": "slicevae_jax.slicevae.density",
    "interpolate_volumes": "slicevae_jax.slicevae.density",
    "memorisation_audit": "slicevae_jax.slicevae.density",
    "run": "slicevae_jax.pipeline",
    "load_baseline": "slicevae_jax.baselines.stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'slicevae_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  """The notebook functions beside what the package already holds (tab completion)."""
  return sorted(set(globals()) | set(_EXPORTS))
