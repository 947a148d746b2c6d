"""The 3D baselines on the shared machinery: one loop (resume), the stages, the comparison."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import make_cache, tiny_config
from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import config_lib, parallel, pipeline
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.baselines import stages as baseline_stages
from slicevae_jax.data import slices as slices_lib
from slicevae_jax.errors import ConfigError, NonFiniteLossError
from slicevae_jax.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def gan_config(model="alpha_wgan", **train):
  c = tiny_config(grid=16, batch_size=2, **train)
  c = baseline_stages.as_baseline(c, model)
  c.train.batch_size = 2
  b = c.baseline
  b.latent_dim, b.max_channels, b.min_channels = 8, 8, 4
  b.code_hidden, b.encoder_hidden, b.vae3d_channels, b.vae3d_latent = 16, 16, 4, 8
  return config_lib.validate(c)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return make_cache(str(tmp_path_factory.mktemp("c") / "cache"), num=6, grid=16)


def test_volume_sampler_is_a_pure_function_of_step(cache):
  a = slices_lib.VolumeSampler(cache, cache.split("train"), 3, seed=5)
  b = slices_lib.VolumeSampler(cache, cache.split("train"), 3, seed=5)
  steps = [a.volumes(s) for s in range(4)]
  assert all(np.array_equal(x, b.volumes(s)) for s, x in enumerate(steps))
  # 4 training volumes, batch 3: the first 4 draws are one permutation of them.
  first_epoch = np.concatenate(steps)[:4]
  assert sorted(first_epoch) == sorted(cache.rows(cache.split("train")))
  x = slices_lib.load_volume_batch(cache, a, 0, np.arange(3))
  assert x.shape == (3, 16, 16, 16, 1) and x.min() >= -1 and x.max() <= 1


def test_gan_resume_equals_uninterrupted(cache, tmp_path):
  mesh = parallel.make_mesh(2)
  full = baseline_stages.train(gan_config(num_steps=3), str(tmp_path / "full"), cache, mesh)
  part = str(tmp_path / "part")
  baseline_stages.train(gan_config(num_steps=2, checkpoint_every=2), part, cache, mesh)
  assert ckpt_lib.finished_steps(os.path.join(part, "checkpoints")) == [2]
  resumed = baseline_stages.train(gan_config(num_steps=3), part, cache, mesh)
  assert int(resumed.step) == int(full.step) == 3
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = read_metrics(part)
  assert [r["step"] for r in rows if "d_loss" in r] == [1, 2, 3]
  assert os.path.exists(os.path.join(part, "images", "train_0000003.png"))


def test_gan_non_finite_batch_stops_with_last_good_checkpoint(cache, tmp_path, monkeypatch):
  real = slices_lib.load_volume_batch

  def poisoned(cache_, sampler, step, rows):
    x = real(cache_, sampler, step, rows)
    return x * np.nan if step >= 2 else x

  monkeypatch.setattr(slices_lib, "load_volume_batch", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(NonFiniteLossError, match=r"alpha_wgan.*step 3.*step 2"):
    baseline_stages.train(gan_config(num_steps=6, checkpoint_every=2, log_every=1), workdir,
                          cache, parallel.make_mesh(2))
  assert ckpt_lib.finished_steps(os.path.join(workdir, "checkpoints")) == [2]


def test_samples_depend_only_on_key_and_index(cache, tmp_path):
  workdir = str(tmp_path / "w")
  mesh = parallel.make_mesh(2)
  config = gan_config("wgan_gp", num_steps=1)
  workdir_lib.save_config(config, workdir)
  baseline_stages.train(config, workdir, cache, mesh)
  bundle = baseline_stages.load_baseline(workdir, mesh=mesh)
  key = jax.random.key(3)
  four = baseline_stages.sample_volumes(bundle, key, 4, batch=2)
  last_two = baseline_stages.sample_volumes(bundle, key, 2, start=2, batch=4)
  assert four.shape == (4, 16, 16, 16) and 0 <= four.min() and four.max() <= 1
  np.testing.assert_allclose(four[2:], last_two, atol=1e-6)
  assert not np.allclose(four[0], four[1])


def _main(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "slicevae_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_baseline_through_main_has_no_fit_latent_stage(tmp_path):
  r = _main("--config=configs/baselines.py:model=vae_gan,demo,smoke", f"--workdir={tmp_path}",
            "--mode=fit_latent", timeout=120)
  assert r.returncode == 2 and "fit_latent" in r.stderr and "vae_gan" in r.stderr


def test_bad_baseline_arguments():
  with pytest.raises(ConfigError, match="res"):
    load_config("baselines", "model=alpha_wgan,res=96")
  with pytest.raises(ConfigError, match="baseline"):
    load_config("baselines", "model=stylegan")
  for model in baseline_stages.BASELINE_LR:
    for res in (64, 128, 256):
      config_lib.validate(load_config("baselines", f"model={model},res={res}"))


def test_compare_smoke_writes_one_table_and_resumes(tmp_path):
  config = load_config("compare", "smoke")
  config.compare.models = ("slice_vae", "vae3d")
  workdir = str(tmp_path / "cmp")
  result = pipeline.compare(config, workdir)
  budget = result["budget"]
  # Equal budget: the same passes over the training volumes (up to rounding up to whole steps).
  assert abs(budget["slice_vae"]["epochs"] - config.compare.epochs) < 0.2
  assert budget["vae3d"]["epochs"] >= config.compare.epochs
  report = open(os.path.join(workdir, "eval", "report.md")).read()
  for name in ("Ours (slice VAE)", "3D VAE", "| Real |", "Equal budget"):
    assert name in report, name
  assert os.path.exists(os.path.join(workdir, "eval", "ras_per_label.png"))
  assert set(result["rows"]) == {"slice_vae", "vae3d"}
  assert result["real"]["ras"]["mean"] > 0
  for model in ("slice_vae", "vae3d"):
    index = json.load(open(os.path.join(workdir, model, "samples", "samples.json")))
    assert len(index["files"]) == config.sample.num_volumes
    scores = json.load(open(os.path.join(workdir, "eval", model, "metrics.json")))
    assert np.isfinite(scores["model"]["mmd_kwon"]["mean"])
  # A second run trains and scores nothing again.
  before = {m: len(read_metrics(os.path.join(workdir, m))) for m in result["models"]}
  stamp = os.path.getmtime(os.path.join(workdir, "eval", "comparison.json"))
  again = pipeline.compare(config, workdir)
  assert before == {m: len(read_metrics(os.path.join(workdir, m))) for m in result["models"]}
  assert os.path.getmtime(os.path.join(workdir, "eval", "comparison.json")) == stamp
  assert again["rows"].keys() == result["rows"].keys()
