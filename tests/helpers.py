"""Shared test fixtures: tiny synthetic volumes and caches, the repository's configs."""

import importlib.util
import os

import numpy as np

from slicevae_jax import config_lib
from slicevae_jax.data.cache import CacheWriter, VolumeCache


def blob_volume(grid: int, rng: np.random.Generator) -> np.ndarray:
  """An ellipsoid 'brain' with an inner 'ventricle', in [0, 1], [grid]*3."""
  c = (np.arange(grid) - grid / 2 + 0.5) / (grid / 2)
  x, y, z = np.meshgrid(c, c, c, indexing="ij")
  a = rng.uniform(0.6, 0.85, 3)
  outer = (x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2
  inner = (x / (0.3 * a[0])) ** 2 + (y / (0.4 * a[1])) ** 2 + (z / (0.3 * a[2])) ** 2
  v = np.where(outer < 1, 0.7 + 0.2 * np.cos(4 * x + rng.uniform(0, 3)), 0.0)
  v = np.where(inner < 1, 0.2, v)
  return np.clip(v + rng.normal(0, 0.01, v.shape) * (outer < 1), 0, 1).astype(np.float32)


def make_cache(path: str, num: int = 6, grid: int = 16, num_val: int = 2, seed: int = 0,
               slice_axis: int = 1, dtype: str = "float32", labels: bool = True) -> VolumeCache:
  rng = np.random.default_rng(seed)
  entries = [{"id": f"s{i:02d}", "split": "val" if i >= num - num_val else "train"}
             for i in range(num)]
  w = CacheWriter(path, entries, (grid,) * 3, slice_axis, dtype, labels)
  affine = np.diag([2.0, 2.0, 2.0, 1.0])
  affine[:3, 3] = -grid
  for i in range(num):
    v = blob_volume(grid, rng)
    lab = (v > 0.5).astype(np.uint8) + (v > 0).astype(np.uint8) if labels else None
    w.write(i, v, affine, lab)
  return w.finalize({"label_names": ["bg", "dark", "bright"] if labels else None})


def load_config(name: str, arg: str | None = None):
  """`configs/<name>.py`'s get_config(arg), e.g. load_config('demo', 'smoke')."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def configs_common():
  """configs/common.py (parse_arg, hcp_recipe, smoke), loaded as the config files load it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return config_lib.load_module(os.path.join(root, "configs", "common.py"))


def tiny_config(grid: int = 16, **train):
  """A slice VAE config small enough to train in seconds on the CPU."""
  c = config_lib.base_config()
  c.data.grid = grid
  c.data.voxel_size = 2.0
  c.data.num_val = 2
  c.model.base_width = 4
  c.model.max_width = 8
  c.model.latent_channels = 8
  c.model.latent_size = 2
  c.train.batch_size = 16
  c.train.num_steps = 3
  c.train.log_every = 1
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.num_val_slices = 16
  c.train.progress = False
  c.latent.num_volumes = 4
  c.latent.rank = 4
  c.sample.num_volumes = 2
  c.sample.batch_volumes = 2
  for k, v in train.items():
    c.train[k] = v
  return config_lib.validate(c)


def identifiable_params(params) -> dict[str, np.ndarray]:
  """Parameters by path, without the biases of convolutions that feed a BatchNorm.

  BatchNorm subtracts the batch mean, so those biases get an exactly-zero true
  gradient; the computed one is rounding noise, which Adam's normalisation
  turns into ±lr steps of arbitrary sign. They differ between any two
  numerically different but equivalent runs (device counts, process counts)
  and carry no information, so invariance tests compare everything else.
  """
  import jax  # pylint: disable=import-outside-toplevel
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if "bias" in name and "Conv" in name and "out_conv" not in name:
      continue
    out[name] = np.asarray(value)
  return out


def write_nifti_folder(path: str, n: int = 5) -> str:
  """A flat folder of n small ellipsoid 'brains' (30x36x30 at 1.5 mm) as .nii.gz."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    v = blob_volume(36, rng)[3:33, :, 3:33] * 80.0
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.save(nib.Nifti1Image(v.astype(np.float32), affine), os.path.join(path, f"sub{i}.nii.gz"))
  return path
