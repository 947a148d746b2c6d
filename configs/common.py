"""Shared by the experiment configs: argument parsing, the paper's HCP recipe, the smoke variant.

Every config in this folder loads this file beside it (`config_lib.load_module`), the way
--config loads the config itself; each experiment's own numbers (grid, voxel size, widths,
rank, step counts) stay in its own file, where they can be read.
"""

from typing import Any

import ml_collections

from slicevae_jax import config_lib
from slicevae_jax.errors import ConfigError

def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'smoke' or 'key=value,flag' config arguments into a ConfigDict.

  Keys not among `defaults` raise ConfigError; values take the defaults' types.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(
          f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        out[key] = type(default)(value)
      except ValueError as e:
        raise ConfigError(f"config argument {key}={value!r}: {e}") from e
  return out


def get(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Another config of this folder, e.g. get('hcp64') or get('demo', 'smoke')."""
  return config_lib.load_module(name + ".py", beside=__file__).get_config(arg)


def hcp_recipe() -> ml_collections.ConfigDict:
  """The paper's HCP settings shared by every resolution (paper §3.2, §3.3).

  N4 bias correction, 40 held-out volumes, coronal slices in batches of 128, Adam 1e-3,
  the latent model fitted on 400 training volumes, 16 samples. The resolution's own
  numbers (grid, voxel size, base width, rank, steps, cache dtype) are set by its config.
  """
  c = config_lib.base_config()
  c.data.source = "nifti"
  c.data.n4 = True
  c.data.num_val = 40
  c.train.batch_size = 128
  c.train.learning_rate = 1e-3
  c.latent.num_volumes = 400
  c.sample.num_volumes = 16
  return c


def smoke(c: ml_collections.ConfigDict, grid: int = 32) -> ml_collections.ConfigDict:
  """Shrinks a config to seconds on a CPU: tiny grid, model and step count.

  Keeps the data source, so `hcpXX.py:smoke` with --config.data.root checks a
  user's data pipeline end to end in a minute.
  """
  c.name += "_smoke"
  c.data.voxel_size = c.data.voxel_size * c.data.grid / grid
  c.data.grid = grid
  c.data.n4 = False
  c.data.num_val = 2
  c.data.num_workers = 1
  c.data.synth.num_subjects = 8
  c.model.base_width = 4
  c.model.max_width = 16
  c.model.latent_channels = 16
  c.train.batch_size = 16
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.eval_every = 4
  c.train.checkpoint_every = 2
  c.train.num_val_slices = 16
  c.train.progress = False
  c.latent.num_volumes = 6
  c.latent.rank = 4
  c.sample.num_volumes = 2
  c.sample.batch_volumes = 2
  c.eval.num_real = 4
  c.eval.mmd_batch = 2
  c.eval.mmd_repeats = 5
  c.eval.msssim_pairs = 4
  c.eval.reg_levels = 2
  c.eval.reg_iters = (20, 10)
  c.eval.reg_lr = 0.02
  c.eval.pair_batch = 4
  c.eval.num_figures = 2
  c.segmenter.widths = (8, 16)
  c.segmenter.num_steps = 20
  c.segmenter.log_every = 10
  c.segmenter.eval_every = 20
  c.segmenter.checkpoint_every = 20
  c.segmenter.num_eval_volumes = 1
  c.segmenter.progress = False
  c.baseline.latent_dim = 16
  c.baseline.max_channels = 16
  c.baseline.min_channels = 4
  c.baseline.code_hidden = 32
  c.baseline.encoder_hidden = 32
  c.baseline.vae3d_channels = 4
  c.baseline.vae3d_latent = 16
  return c
