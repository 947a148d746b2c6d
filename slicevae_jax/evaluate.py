"""Evaluate stage, old entry point: `python -m slicevae_jax.evaluate` and the README's calls.

The code is in eval/evaluate.py (stage, arrays, folders) and eval/report.py; the
command is `python -m slicevae_jax.main --mode=evaluate_folders`, which this one runs
(its --segmenter_workdir is main's --workdir).
"""

from slicevae_jax.eval.evaluate import evaluate_volumes
from slicevae_jax.eval.report import write_report

__all__ = ["evaluate_volumes", "write_report"]

if __name__ == "__main__":
  from slicevae_jax import main   # only as a program: importing this module defines no flags
  main.cli(mode="evaluate_folders")
