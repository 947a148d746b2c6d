"""Config schema errors and the cache format (atomic, resumable, slice-major)."""

import os

import numpy as np
import pytest

from helpers import configs_common, make_cache
from slicevae_jax import config_lib, fileio
from slicevae_jax.data.cache import CacheWriter, VolumeCache, to_stack, to_volume
from slicevae_jax.errors import ConfigError, DataError


def test_unknown_key_is_named():
  c = config_lib.base_config()
  c.train.unlocked = 1  # an unlocked ConfigDict accepts new keys; validate() must not
  with pytest.raises(ConfigError, match="train.unlocked"):
    config_lib.validate(c)


@pytest.mark.parametrize("grid", [48, 6, 100])
def test_grid_the_model_cannot_take(grid):
  c = config_lib.base_config()
  c.data.grid = grid
  with pytest.raises(ConfigError, match="data.grid"):
    config_lib.validate(c)


@pytest.mark.parametrize("key,value", [("model.bn_mode", "batch"), ("data.source", "web"),
                                       ("data.cache_dtype", "int16"), ("data.slice_axis", 3),
                                       ("segmenter.loss", "focal")])
def test_bad_choice_is_named(key, value):
  c = config_lib.base_config()
  group, name = key.split(".")
  c[group][name] = value
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c)


def test_parse_arg():
  common = configs_common()
  assert common.parse_arg("smoke", smoke=False).smoke is True
  assert common.parse_arg("res=128", res=64).res == 128
  with pytest.raises(ConfigError, match="resolution"):
    common.parse_arg("resolution=3", res=64)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stack_volume_roundtrip(axis):
  v = np.random.rand(3, 4, 5)
  s = to_stack(v, axis)
  assert s.shape[0] == v.shape[axis]
  np.testing.assert_array_equal(to_volume(s, axis), v)
  np.testing.assert_array_equal(to_volume(s[None], axis)[0], v)


@pytest.mark.parametrize("dtype,tol", [("float32", 0), ("float16", 1e-3), ("uint8", 0.5 / 255)])
def test_cache_roundtrip(tmp_path, dtype, tol):
  cache = make_cache(str(tmp_path / "c"), num=3, grid=8, num_val=1, dtype=dtype)
  again = VolumeCache(cache.path)
  assert len(again) == 3 and again.split("val") == [2] and again.grid == (8, 8, 8)
  v = again.volume(0)
  assert v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1
  rows, sl = np.array([0, 2, 0]), np.array([3, 1, 5])
  got = again.gather(rows, sl)
  for k in range(3):
    np.testing.assert_allclose(got[k], again.stack(int(rows[k]))[sl[k]], atol=1e-7)
  assert again.label_volume(1).dtype == np.uint8
  assert not os.path.exists(cache.path + ".partial")


def test_cache_resumes_and_skips(tmp_path):
  path = str(tmp_path / "c")
  entries = [{"id": f"s{i}", "split": "train"} for i in range(3)]
  w = CacheWriter(path, entries, (4, 4, 4), 1, "float32", False, {"a": 1})
  w.write(0, np.full((4, 4, 4), 0.5), np.eye(4))
  del w  # interrupted: no manifest, no final folder
  assert not VolumeCache.exists(path)
  with pytest.raises(DataError, match="unfinished cache"):
    VolumeCache(path)
  w = CacheWriter(path, entries, (4, 4, 4), 1, "float32", False, {"a": 1})
  assert w.pending == [1, 2]
  w.skip(1, "bad file")
  w.write(2, np.zeros((4, 4, 4)), np.eye(4))
  cache = w.finalize()
  assert [s["id"] for s in cache.subjects] == ["s0", "s2"]
  assert cache.manifest["skipped"][0]["reason"] == "bad file"
  np.testing.assert_allclose(cache.volume(0), 0.5)
  # A different plan does not resume the old partial folder.
  w = CacheWriter(str(tmp_path / "d"), entries, (4, 4, 4), 1, "float32", False, {"a": 1})
  w.write(0, np.zeros((4, 4, 4)), np.eye(4))
  w = CacheWriter(str(tmp_path / "d"), entries, (4, 4, 4), 1, "float32", False, {"a": 2})
  assert w.pending == [0, 1, 2]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / "out.json"
  fileio.write_json(target, {"a": 1})
  with pytest.raises(RuntimeError):
    with fileio.atomic_path(target) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("killed")
  assert fileio.read_json(target) == {"a": 1}
  assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_write_has_the_umask_permissions(tmp_path):
  mask = os.umask(0o022)
  try:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    fileio.write_text(tmp_path / "atomic.txt", "x")
    fileio.save_npz(tmp_path / "a.npz", x=np.zeros(2))
  finally:
    os.umask(mask)
  want = os.stat(plain).st_mode & 0o777
  assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == want
  assert os.stat(tmp_path / "a.npz").st_mode & 0o777 == want


def test_concurrent_shard_writers_share_one_plan(tmp_path):
  path = str(tmp_path / "c")
  entries = [{"id": f"s{i}", "split": "train"} for i in range(4)]
  a = CacheWriter(path, entries, (4, 4, 4), 1, "uint8", False, shard=(0, 2))
  b = CacheWriter(path, entries, (4, 4, 4), 1, "uint8", False, shard=(1, 2))
  assert a.pending == [0, 2] and b.pending == [1, 3]
  for w in (a, b):
    for row in w.pending:
      w.write(row, np.full((4, 4, 4), row / 4), np.eye(4))
  assert a.complete and b.complete
  cache = b.finalize()
  np.testing.assert_allclose([cache.volume(i).mean() for i in range(4)],
                             [0, 0.25, 0.5, 0.75], atol=1 / 255)
  with pytest.raises(DataError, match="shard 2 of 2"):
    CacheWriter(str(tmp_path / "d"), entries, (4, 4, 4), 1, "uint8", False, shard=(2, 2))
