"""The density modes through main: NIfTI files in, the files each mode promises out, and bad
input refused with one 'error:' line and nothing written."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import make_cache, tiny_config
from slicevae_jax import pipeline
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.slicevae import density_stages, inference
from slicevae_jax.data import nifti
from slicevae_jax.eval import audit as audit_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 16³ workdir trained 3 steps, with per_dim (main) and joint latent models, its config
  as a file for --config, and NIfTI inputs: two held-out volumes as the sample stage writes
  them (on the grid) and one raw scan at another voxel size that needs preprocessing."""
  root = str(tmp_path_factory.mktemp("modes"))
  cache = make_cache(os.path.join(root, "cache"), num=6, grid=16, num_val=2, labels=False)
  config = tiny_config()
  config.data.cache_dir = cache.path
  config.eval.latent_models = ("per_dim", "joint")
  wd = os.path.join(root, "run")
  pipeline.run(config, wd, "train")
  pipeline.run(config, wd, "fit_latent")
  cfg = os.path.join(root, "config.py")
  with open(cfg, "w", encoding="utf-8") as f:
    f.write("from slicevae_jax import workdir\n"
            f"def get_config():\n  return workdir.load_config({wd!r})\n")
  inputs = os.path.join(root, "inputs")
  for j, i in enumerate(cache.split("val")):
    nifti.save_volume(os.path.join(inputs, f"val{j}.nii.gz"), cache.volume(i), cache.affine(i))
  raw = np.pad(cache.volume(0), 4)[::-1] * 900.0          # scanner units, 1 mm, LAS on disk
  img = nib.Nifti1Image(np.kron(raw, np.ones((2, 2, 2))).astype(np.float32),
                        np.diag([-1.0, 1.0, 1.0, 1.0]))
  raw_path = os.path.join(root, "raw", "scan.nii.gz")
  os.makedirs(os.path.dirname(raw_path))
  nib.save(img, raw_path)
  return wd, cfg, inputs, raw_path


def _main(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "slicevae_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_recipe_is_stored_with_the_workdir(workdir):
  recipe = json.load(open(workdir_lib.recipe_file(workdir[0])))
  assert recipe["grid"] == 16 and recipe["voxel_size"] == 2.0 and recipe["slice_axis"] == 1


def test_inputs_on_the_grid_are_used_as_given_others_preprocessed(workdir):
  wd, _, inputs, raw = workdir
  bundle = inference.load_for_inference(wd)
  r = density_stages.load_recipe(wd, bundle.config, None)
  got = density_stages.read_inputs(f"{inputs},{raw}", r)
  assert [x.name for x in got] == ["val0", "val1", "scan"]
  assert got[0].how.startswith("as given") and got[2].how == "preprocessed"
  assert all(x.volume.shape == (16,) * 3 and 0 <= x.volume.min() <= x.volume.max() <= 1
             for x in got)


def test_score_complete_interpolate_through_main(workdir, tmp_path):
  wd, cfg, inputs, raw = workdir
  base = [f"--config={cfg}", f"--workdir={wd}"]
  out = str(tmp_path / "score")
  r = _main(*base, "--mode=score", f"--inputs={inputs},{raw}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  index = json.load(open(os.path.join(out, "scores.json")))
  assert "not a density of the image" in index["note"]
  assert [set(v["models"]) for v in index["volumes"]] == [{"per_dim", "joint"}] * 3
  for name in ("val0", "val1", "scan"):
    assert os.path.exists(os.path.join(out, f"{name}_slices.png"))
    rows = open(os.path.join(out, f"{name}_slices.csv")).read().splitlines()
    assert len(rows) == 17 and rows[0].startswith("slice,per_dim_log_p_given_rest")
  assert len(open(os.path.join(out, "scores.csv")).read().splitlines()) == 1 + 3 * 2

  out = str(tmp_path / "complete")
  r = _main(*base, "--mode=complete", f"--inputs={inputs}/val0.nii.gz", "--keep_every=4",
            "--num_samples=2", "--latent_model=joint", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  index = json.load(open(os.path.join(out, "completion.json")))
  assert index["observed_slices"] == [0, 4, 8, 12] and index["latent_model"] == "joint"
  done = nib.load(os.path.join(out, "val0_completed.nii.gz"))
  given = nib.load(os.path.join(inputs, "val0.nii.gz"))
  np.testing.assert_allclose(done.affine, given.affine)
  np.testing.assert_array_equal(done.get_fdata()[:, ::4], given.get_fdata()[:, ::4])
  assert os.path.exists(os.path.join(out, "val0_std.nii.gz"))

  out = str(tmp_path / "interp")
  r = _main(*base, "--mode=interpolate", f"--inputs={inputs}", "--steps=3", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  index = json.load(open(os.path.join(out, "interpolation.json")))
  assert index["files"] == ["step_00.nii.gz", "step_01.nii.gz", "step_02.nii.gz"]
  np.testing.assert_allclose(index["endpoint_mse"], index["plain_encode_decode_mse"], rtol=1e-3)
  assert os.path.exists(os.path.join(out, "interpolation.png"))


def _bad_inputs(root):
  """(name, --inputs value, extra flags, what the error must say) for each refusal."""
  os.makedirs(root, exist_ok=True)
  junk = os.path.join(root, "junk.nii.gz")
  with open(junk, "wb") as f:
    f.write(b"not a nifti file at all")
  flat = os.path.join(root, "slice2d.nii.gz")
  nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), flat)
  tiny = os.path.join(root, "tiny.nii.gz")
  v = np.zeros((40, 40, 40), np.float32)
  v[18:21, 18:21, 18:21] = 100.0
  nib.save(nib.Nifti1Image(v, np.eye(4)), tiny)
  return [("unreadable", junk, "cannot read"), ("2D", flat, "dimensions"),
          ("not brain-sized", tiny, "implausibly small")]


def test_bad_input_refused_naming_the_file_nothing_written(workdir, tmp_path):
  wd, _, inputs, _ = workdir
  good = os.path.join(inputs, "val0.nii.gz")
  os.makedirs(tmp_path / "empty")
  cases = [(p, says) for _, p, says in _bad_inputs(str(tmp_path / "bad"))]
  cases += [(str(tmp_path / "absent.nii.gz"), "does not exist"),
            (str(tmp_path / "empty"), "no .nii")]
  for mode, extra in (("score", {}), ("complete", {"keep_every": 2}), ("interpolate", {})):
    for path, says in cases:
      out = str(tmp_path / f"{mode}_{os.path.basename(path)}")
      # The good volume first, so a partial write would happen before the refusal.
      opts = density_stages.Options(inputs=f"{good},{path}", out=out, **extra)
      with pytest.raises(DataError, match=says) as err:
        density_stages.run_workdir(wd, mode, opts)
      assert path in str(err.value) and not os.path.exists(out)
  for mode, opts, says in [
      ("interpolate", density_stages.Options(inputs=inputs + "," + good), "exactly 2"),
      ("complete", density_stages.Options(inputs=good), "exactly one of --keep_every"),
      ("complete", density_stages.Options(inputs=good, missing="3:99"), "'3:99'"),
      ("score", density_stages.Options(inputs=good, latent_model="rotated"), "has latent")]:
    opts.out = str(tmp_path / "refused")
    with pytest.raises((ConfigError, DataError), match=says):
      density_stages.run_workdir(wd, mode, opts)
    assert not os.path.exists(opts.out)


def test_bad_input_through_main_is_one_error_line(workdir, tmp_path):
  wd, cfg, inputs, _ = workdir
  _, junk, _ = _bad_inputs(str(tmp_path / "bad"))[0]
  out = str(tmp_path / "out")
  r = _main(f"--config={cfg}", f"--workdir={wd}", "--mode=score",
            f"--inputs={inputs}/val0.nii.gz,{junk}", f"--out={out}")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and lines[-1].startswith(f"error: {junk}: cannot read"), lines[-3:]
  assert not os.path.exists(out)


def test_audit_section_of_the_report(workdir, tmp_path):
  wd, _, _, _ = workdir
  bundle = inference.load_for_inference(wd)
  cache = VolumeCache(bundle.config.data.cache_dir)
  train_ids, val_ids = cache.split("train"), cache.split("val")
  real = np.stack([cache.volume(i) for i in val_ids])
  # Two copies of training subjects and one fresh volume: the copies must be named.
  samples = np.stack([cache.volume(train_ids[2]), cache.volume(train_ids[0]), real[0] * 0.5])
  audit = audit_lib.audit_workdir(cache, samples, real, bundle, str(tmp_path))
  ids = [cache.subjects[i]["id"] for i in train_ids]
  for space in ("voxel", "latent"):
    assert audit[space]["nearest_train"][:2] == [ids[2], ids[0]]
    assert audit[space]["d_train"][0] == pytest.approx(0, abs=1e-5)
  assert audit["closest_pairs"][:2] in ([0, 1], [1, 0])
  assert os.path.exists(tmp_path / audit_lib.AUDIT_PNG)
  md = "\n".join(audit_lib.audit_markdown(audit, ["a", "b", "c"]))
  assert "## Memorisation audit" in md and f"| a | {ids[2]} (" in md
  json.dumps(audit_lib.audit_summary(audit))
