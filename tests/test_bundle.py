"""Model bundles: export, the round trip through load_for_inference and sampling, refusals."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import make_cache, tiny_config
from slicevae_jax import bundle as bundle_lib
from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import fileio, parallel, pipeline
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data import nifti
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError, DataError
from slicevae_jax.models import slice_vae
from slicevae_jax.slicevae import density_stages, fit_latent, inference, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with a checkpoint, the main latent model and one other."""
  root = tmp_path_factory.mktemp("b")
  cache = make_cache(str(root / "cache"), num=6, grid=16, num_val=2, slice_axis=1)
  config = tiny_config()
  config.data.cache_dir = str(root / "cache")
  config.eval.latent_models = ("per_dim", "joint")
  wd = str(root / "run")
  os.makedirs(wd)
  workdir_lib.save_config(config, wd)
  state = train.create_state(slice_vae.from_config(config), train.make_optimizer(config),
                             parallel.make_mesh(), jax.random.key(0))
  ckpt = ckpt_lib.Checkpointer(workdir_lib.checkpoint_dir(wd))
  ckpt.save(5, state)
  ckpt.close()
  fit_latent.fit_latent(config, wd, cache)
  return wd, config


def test_bundle_round_trip_samples_like_the_workdir(trained, tmp_path):
  wd, config = trained
  out = bundle_lib.export(wd, str(tmp_path / "my bundle"))      # a space in the path
  index = bundle_lib.verify(out)
  assert index["checkpoint_step"] == 5 and index["latent_models"][0] == config.latent.model
  assert set(index["latent_models"]) == {config.latent.model, *config.eval.latent_models}
  for name in ("README.md", "config.json", "config.py", "preprocess.json",
               "latent_gaussian.npz", *[f"latent_{k}.npz" for k in index["latent_models"][1:]]):
    assert os.path.isfile(os.path.join(out, name)), name
  assert not os.path.exists(os.path.join(out, "cache"))
  assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
  card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
  assert "16³ voxels" in card and "5 steps" in card and "Intended use" in card
  recipe = fileio.read_json(os.path.join(out, "preprocess.json"))
  assert recipe["grid"] == 16 and recipe["slice_axis"] == config.data.slice_axis

  # The same model: identical samples from the bundle and from the workdir.
  key = jax.random.key(3)
  a = inference.sample_volumes(inference.load_for_inference(wd), key, num=2)
  b = inference.sample_volumes(inference.load_for_inference(out), key, num=2)
  np.testing.assert_array_equal(a, b)

  # --mode=sample on the bundle: no data needed, the bundle's config.json untouched.
  before = open(os.path.join(out, "config.json"), encoding="utf-8").read()
  sample_config = workdir_lib.load_config(out)
  sample_config.sample.num_volumes = 2
  pipeline.run(sample_config, out, "sample")
  assert len([n for n in os.listdir(os.path.join(out, "samples")) if n.endswith(".nii.gz")]) == 2
  assert open(os.path.join(out, "config.json"), encoding="utf-8").read() == before
  with pytest.raises(ConfigError, match="model bundle"):
    pipeline.run(sample_config, out, "train")


def test_export_refusals_and_corruption(trained, tmp_path):
  wd, _ = trained
  out = bundle_lib.export(wd, str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="already exists"):
    bundle_lib.export(wd, out)
  with open(os.path.join(out, "latent_gaussian.npz"), "ab") as f:
    f.write(b"x")
  with pytest.raises(DataError, match="latent_gaussian.npz: content differs"):
    bundle_lib.verify(out)
  empty = tmp_path / "untrained"
  os.makedirs(empty)
  workdir_lib.save_config(tiny_config(), str(empty))
  with pytest.raises(DataError, match="run --mode=fit_latent"):
    bundle_lib.export(str(empty), str(tmp_path / "c"))
  assert not os.path.exists(tmp_path / "c")


def test_export_through_main(trained, tmp_path):
  wd, _ = trained
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-m", "slicevae_jax.main", "--config=configs/demo.py:smoke",
         f"--workdir={wd}", "--mode=export"]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "error: --mode=export needs --out" in r.stderr
  r = subprocess.run(cmd + [f"--out={tmp_path / 'cli'}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert workdir_lib.is_bundle(str(tmp_path / "cli"))


def test_density_modes_read_a_bundle_as_they_read_its_workdir(trained, tmp_path):
  wd, config = trained
  out = bundle_lib.export(wd, str(tmp_path / "b"))
  assert os.path.isfile(workdir_lib.score_reference(out))
  cache = VolumeCache(config.data.cache_dir)
  i = cache.split("val")[0]
  scan = str(tmp_path / "scan.nii.gz")
  nifti.save_volume(scan, cache.volume(i), cache.affine(i))
  runs = {}
  for name, where in (("bundle", out), ("workdir", wd)):
    runs[name] = density_stages.run_workdir(where, "score", density_stages.Options(
        inputs=scan, out=str(tmp_path / f"score_{name}")))
  a, b = runs["bundle"]["volumes"][0], runs["workdir"]["volumes"][0]
  assert a["recon_percentile"] == b["recon_percentile"]
  assert set(a["models"]) == set(b["models"]) == set(config.eval.latent_models)
  for kind in a["models"]:
    assert a["models"][kind]["log_density"] == pytest.approx(b["models"][kind]["log_density"],
                                                             rel=1e-5)
    assert (a["models"][kind]["log_density_percentile"]
            == b["models"][kind]["log_density_percentile"])
  assert runs["bundle"]["reference"]["source"] == workdir_lib.score_reference(out)
  done = density_stages.run_workdir(out, "complete", density_stages.Options(
      inputs=scan, keep_every=2, num_samples=2, out=str(tmp_path / "complete")))
  assert os.path.isfile(os.path.join(tmp_path, "complete", "completion.json")) and done
