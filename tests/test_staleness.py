"""What `--mode=all` does after a config change: refuse the cache, refit, resample; rng streams.

One tiny trained workdir (demo smoke through `pipeline.run`, about a minute) is
shared by the module; tests that run stages on it work on a copy.
"""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from helpers import load_config, make_cache, tiny_config, write_nifti_folder
from slicevae_jax import config_lib, fileio, pipeline, rng, staleness
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data import preprocess, synth
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError
from slicevae_jax.slicevae import fit_latent
from slicevae_jax.slicevae import latent as lg

STEP = 4  # demo smoke's train.num_steps


def _with(config: ml_collections.ConfigDict, key: str, value) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted `key` set (new keys too: latent.model may not exist yet)."""
  c = ml_collections.ConfigDict(config.to_dict())
  *groups, name = key.split(".")
  node = c
  for g in groups:
    node = node[g]
  node[name] = value
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config, workdir): demo smoke trained, latent fitted and sampled (no evaluation)."""
  config = load_config("demo", "smoke")
  wd = str(tmp_path_factory.mktemp("trained") / "w")
  pipeline.run(config, wd, "all", evaluate=False)
  return config, wd


@pytest.fixture
def workdir_copy(trained, tmp_path):
  config, wd = trained
  dst = str(tmp_path / "w")
  shutil.copytree(wd, dst)
  return ml_collections.ConfigDict(config.to_dict()), dst


@pytest.fixture
def info_logs(caplog):
  caplog.set_level(logging.INFO)
  return caplog


def _latent_path(wd: str) -> str:
  return workdir_lib.latent_file(wd)


def _index(wd: str) -> dict:
  return fileio.read_json(workdir_lib.samples_index(wd))


# --------------------------------------------------------------------------
# Latent fit and samples
# --------------------------------------------------------------------------


def test_unchanged_config_is_current(trained):
  config, wd = trained
  assert fit_latent.is_current(wd, config, STEP)
  assert pipeline.samples_current(wd, config, STEP)
  _, meta = lg.load(_latent_path(wd))
  assert meta["fit_inputs"] == fit_latent.fit_inputs(config, STEP)
  assert _index(wd)["latent_sha256"] == staleness.file_sha256(_latent_path(wd))


@pytest.mark.parametrize("key,value,recorded", [
    ("latent.rank", 2, "rank_requested"),
    ("latent.num_volumes", 5, "num_volumes_requested"),
    ("latent.model", "another", "model"),
    ("model.bn_mode", "volume", "bn_mode"),
    ("seed", 7, "seed"),
])
def test_a_changed_fit_input_makes_the_fit_stale(trained, info_logs, key, value, recorded):
  config, wd = trained
  assert not fit_latent.is_current(wd, _with(config, key, value), STEP)
  assert f"{recorded}: " in info_logs.text and "stale" in info_logs.text
  assert not fit_latent.is_current(wd, config, STEP + 1)


def test_a_latent_file_without_the_record_is_stale(workdir_copy):
  config, wd = workdir_copy
  g, meta = lg.load(_latent_path(wd))
  del meta["fit_inputs"]
  lg.save(_latent_path(wd), g, meta)
  assert not fit_latent.is_current(wd, config, STEP)


def test_samples_go_stale_with_the_latent_file_or_bn_mode(workdir_copy, info_logs):
  config, wd = workdir_copy
  assert pipeline.samples_current(wd, config, STEP)
  assert not pipeline.samples_current(wd, _with(config, "model.bn_mode", "volume"), STEP)
  assert "bn_mode: running -> volume" in info_logs.text
  g, meta = lg.load(_latent_path(wd))
  lg.save(_latent_path(wd), g, dict(meta, fit_seconds=meta["fit_seconds"] + 1.0))
  assert not pipeline.samples_current(wd, config, STEP)
  assert "latent_sha256" in info_logs.text


def test_rank_change_refits_and_resamples_then_skips(workdir_copy, info_logs):
  config, wd = workdir_copy
  old_sha = staleness.file_sha256(_latent_path(wd))
  config.latent.rank = 2
  pipeline.run(config, wd, "all", evaluate=False)
  _, meta = lg.load(_latent_path(wd))
  assert meta["fit_inputs"]["rank_requested"] == 2 and meta["rank"] == 2
  new_sha = staleness.file_sha256(_latent_path(wd))
  assert new_sha != old_sha and _index(wd)["latent_sha256"] == new_sha
  assert "rank_requested: 4 -> 2" in info_logs.text
  # Nothing changed since: both stages are skipped and their files left alone.
  stamp = os.path.getmtime(workdir_lib.samples_index(wd))
  info_logs.clear()
  pipeline.run(config, wd, "all", evaluate=False)
  assert "fit_latent: current" in info_logs.text and "sample: current" in info_logs.text
  assert staleness.file_sha256(_latent_path(wd)) == new_sha
  assert os.path.getmtime(workdir_lib.samples_index(wd)) == stamp


def test_bn_mode_switches_on_a_trained_workdir(workdir_copy):
  config, wd = workdir_copy
  config.model.bn_mode = "volume"
  pipeline.run(config, wd, "all", evaluate=False)
  recorded = fileio.read_json(os.path.join(wd, workdir_lib.CONFIG_FILE))
  assert recorded["model"]["bn_mode"] == "volume"
  _, meta = lg.load(_latent_path(wd))
  assert meta["fit_inputs"]["bn_mode"] == "volume"
  index = _index(wd)
  assert index["bn_mode"] == "volume"
  assert index["latent_sha256"] == staleness.file_sha256(_latent_path(wd))
  # The rest of the model group stays frozen under the checkpoints.
  with pytest.raises(ConfigError, match="model"):
    workdir_lib.record_config(_with(config, "model.base_width", 8), wd)


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("data.voxel_size", 5.0),
    ("data.percentiles", (0.5, 99.5)),
    ("data.foreground_percentiles", False),
    ("data.antialias", False),
    ("data.cache_dtype", "uint8"),
    ("data.synth.noise_std", 0.02),
    ("data.synth.num_subjects", 9),
    ("seed", 7),
    ("data.grid", 16),
])
def test_a_synthetic_cache_with_other_settings_is_refused(trained, key, value):
  config, wd = trained
  path = workdir_lib.cache_dir(config, wd)
  with pytest.raises(ConfigError) as err:
    pipeline.prepare_cache(_with(config, key, value), wd)
  msg = str(err.value)
  assert f"{key}: cached " in msg and ", configured " in msg
  assert "data.cache_dir" in msg and f"delete {path}" in msg


def test_a_new_generator_version_is_refused(trained, monkeypatch):
  config, wd = trained
  monkeypatch.setattr(synth, "GENERATOR_VERSION", synth.GENERATOR_VERSION + 1)
  with pytest.raises(ConfigError, match="GENERATOR_VERSION"):
    pipeline.prepare_cache(config, wd)


@pytest.fixture(scope="module")
def nifti_cache(tmp_path_factory):
  root = tmp_path_factory.mktemp("nifti")
  config = _with(tiny_config(), "data.root", write_nifti_folder(str(root / "data"), n=3))
  config.data.num_workers = 1
  return config, preprocess.build_cache(config, str(root / "cache"))


@pytest.mark.parametrize("key,value", [
    ("data.n4", True),
    ("data.label_map", "none"),
    ("data.voxel_size", 2.5),
    ("data.percentiles", (2.0, 98.0)),
    ("data.cache_dtype", "float16"),
    ("data.source", "synthetic"),
])
def test_a_nifti_cache_with_other_settings_is_refused(nifti_cache, key, value):
  config, cache = nifti_cache
  pipeline._check_cache(config, cache)
  with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: cached .*, configured"):
    pipeline._check_cache(_with(config, key, value), cache)


def test_an_old_cache_without_a_setting_is_used_with_a_warning(nifti_cache, tmp_path, caplog,
                                                               monkeypatch):
  config, cache = nifti_cache
  monkeypatch.setitem(cache.manifest, "settings",
                      {k: v for k, v in cache.manifest["settings"].items() if k != "n4"})
  pipeline._check_cache(_with(config, "data.n4", True), cache)
  assert "does not record data.n4" in caplog.text
  with pytest.raises(ConfigError, match="data.antialias"):
    pipeline._check_cache(_with(config, "data.antialias", False), cache)
  # A cache that records no settings at all (made by hand) is only checked for its grid.
  bare = make_cache(str(tmp_path / "bare"), num=3, grid=16, num_val=1)
  pipeline._check_cache(tiny_config(), bare)
  with pytest.raises(ConfigError, match="data.slice_axis"):
    pipeline._check_cache(_with(tiny_config(), "data.slice_axis", 2), bare)


# --------------------------------------------------------------------------
# Named random streams
# --------------------------------------------------------------------------


def _key_bits(key: jax.Array) -> tuple[int, ...]:
  return tuple(np.asarray(jax.random.key_data(key)).tolist())


def test_streams_are_distinct_fixed_and_independent_of_the_table(monkeypatch):
  assert len(set(rng.STREAMS.values())) == len(rng.STREAMS)
  keys = {name: _key_bits(rng.key(0, name)) for name in rng.STREAMS}
  assert len(set(keys.values())) == len(keys)
  assert keys["synth"] == _key_bits(jax.random.fold_in(jax.random.key(0), rng.STREAMS["synth"]))
  assert _key_bits(rng.key(1, "synth")) != keys["synth"]
  draws = {name: rng.generator(0, name).random() for name in rng.STREAMS}
  assert len(set(draws.values())) == len(draws)
  # A new purpose changes nothing that existed.
  monkeypatch.setitem(rng.STREAMS, "new_purpose", max(rng.STREAMS.values()) + 1)
  assert all(_key_bits(rng.key(0, n)) == k for n, k in keys.items())
  assert all(rng.generator(0, n).random() == d for n, d in draws.items())
  with pytest.raises(KeyError, match="STREAMS"):
    rng.key(0, "no_such_purpose")


def test_synthetic_subjects_never_meet_another_stream():
  root = rng.key(0, "synth")
  subjects = jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(root, i)))(
      jnp.arange(4096))
  subject_bits = {tuple(row) for row in np.asarray(subjects).tolist()}
  assert len(subject_bits) == 4096
  assert not subject_bits & {_key_bits(rng.key(0, n)) for n in rng.STREAMS}
  # Per-epoch sampler generators stay apart from the other host streams.
  epochs = {np.random.default_rng([*rng.entropy(0, "train_batches"), e]).random()
            for e in range(1, 64)}
  others = {rng.generator(0, n).random() for n in rng.STREAMS if n != "train_batches"}
  assert not epochs & others


def test_a_synthetic_subject_does_not_depend_on_the_count():
  c = config_lib.base_config()
  c.data.source = "synthetic"
  c.data.grid = 32
  c.data.voxel_size = 6.0
  c.data.synth.num_subjects = 3
  image, labels, _ = synth.generate_subject(2, c)
  c.data.synth.num_subjects = 40
  again, again_labels, _ = synth.generate_subject(2, c)
  np.testing.assert_array_equal(image, again)
  np.testing.assert_array_equal(labels, again_labels)
  # The subject is drawn from the 'synth' stream, not from fold_in(key(seed), i).
  gen = synth._Generator(c)
  assert _key_bits(gen.root) == _key_bits(rng.key(c.seed, "synth"))


def test_latent_subjects_come_from_their_stream(trained):
  config, wd = trained
  _, meta = lg.load(_latent_path(wd))
  cache = VolumeCache(workdir_lib.cache_dir(config, wd))
  train_ids = cache.split("train")
  n = min(config.latent.num_volumes, len(train_ids))
  want = sorted(rng.generator(config.seed, "latent_subjects").choice(
      train_ids, size=n, replace=False).tolist())
  assert meta["subjects"] == [cache.subjects[i]["id"] for i in want]
