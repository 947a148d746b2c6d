"""Preprocessing split over shards (processes, hosts or jobs) makes one cache."""

import numpy as np

from helpers import load_config, write_nifti_folder
from slicevae_jax import config_lib
from slicevae_jax.data import preprocess
from slicevae_jax.data.cache import VolumeCache


def _config(root):
  c = load_config("hcp64", "smoke")
  c.data.root = root
  c.data.num_val = 1
  return c


def test_shards_merge_into_the_unsharded_cache(tmp_path):
  root = write_nifti_folder(str(tmp_path / "data"), n=5)
  config = _config(root)
  whole = preprocess.build_cache(config, str(tmp_path / "whole"))
  path = str(tmp_path / "sharded")
  # Shards run one after another here; on a cluster they run at once.
  assert preprocess.build_cache(config, path, shard=(1, 3)) is None
  assert preprocess.build_cache(config, path, shard=(0, 3)) is None
  assert not VolumeCache.exists(path)
  merged = preprocess.build_cache(config, path, shard=(2, 3))    # the last shard finalises
  assert merged is not None and VolumeCache.exists(path)
  assert [s["id"] for s in merged.subjects] == [s["id"] for s in whole.subjects]
  assert [s["split"] for s in merged.subjects] == [s["split"] for s in whole.subjects]
  for i in range(len(whole)):
    np.testing.assert_array_equal(merged.volume(i), whole.volume(i))
    np.testing.assert_allclose(merged.affine(i), whole.affine(i))
  # A shard that runs again after the merge just opens the finished cache.
  assert preprocess.build_cache(config, path, shard=(0, 3)).path == merged.path


def test_shard_config_is_checked():
  c = config_lib.base_config()
  c.data.num_shards, c.data.shard_index = 2, 2
  import pytest
  from slicevae_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="shard_index"):
    config_lib.validate(c)
