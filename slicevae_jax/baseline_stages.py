"""Baseline stages, old import path (README's `baseline_stages`): see baselines/stages.py."""

from slicevae_jax.baselines.stages import load_baseline, sample_volumes

__all__ = ["load_baseline", "sample_volumes"]
