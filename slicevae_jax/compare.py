"""Model comparison, old entry point: `python -m slicevae_jax.compare` (pipeline.compare).

The same as `python -m slicevae_jax.main --mode=compare --config=configs/compare.py
--workdir=DIR`, which this one runs.
"""

if __name__ == "__main__":
  from slicevae_jax import main   # only as a program: importing this module defines no flags
  main.cli(mode="compare")
