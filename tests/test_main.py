"""End to end through the command line and the pipeline, and bad input at the top level."""

import json
import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import load_config, write_nifti_folder
from slicevae_jax import config_lib, pipeline
from slicevae_jax.errors import ConfigError, DataError
from slicevae_jax.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An absl INFO line from orbax's checkpoint manager (the bulk of a run's library logging).
ORBAX_INFO = re.compile(r"^I\d{4} [^\]]* checkpoint_manager\.py:\d+\]", re.M)


def _main(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "slicevae_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name", ["demo", "hcp64", "hcp128", "hcp256"])
def test_configs_are_valid(name):
  for arg in (None, "smoke"):
    config_lib.validate(load_config(name, arg))
  with pytest.raises(ConfigError, match="fast"):
    load_config(name, "fast")


def test_demo_smoke_end_to_end_through_main(tmp_path):
  workdir = str(tmp_path / "demo")
  r = _main("--config=configs/demo.py:smoke", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-4000:]
  # Quiet by default: the project's stage lines, none of orbax's INFO lines.
  assert not ORBAX_INFO.search(r.stderr), r.stderr[-4000:]
  assert "checkpoint saved at step" in r.stderr and "wrote 2 samples" in r.stderr
  samples = sorted(f for f in os.listdir(os.path.join(workdir, "samples")) if f.endswith(".gz"))
  assert len(samples) == 2
  img = nib.load(os.path.join(workdir, "samples", samples[0]))
  assert img.shape == (32, 32, 32) and 0 <= img.get_fdata().min() <= img.get_fdata().max() <= 1
  assert os.path.exists(os.path.join(workdir, "samples", samples[0].replace(".nii.gz", ".png")))
  for f in ("config.json", "latent_gaussian.npz", "metrics.jsonl", "cache/manifest.json",
            "eval/metrics.json", "eval/report.md", "eval/ras_per_label.png", "segmenter/metrics.jsonl"):
    assert os.path.exists(os.path.join(workdir, f)), f
  scores = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert scores["model"]["ras"]["mean"] >= 0 and scores["real"]["ras"]["mean"] > 0
  report = open(os.path.join(workdir, "eval", "report.md")).read()
  assert "| Real |" in report
  # One row per latent model fitted on the checkpoint, plus the held-out reconstructions.
  names = [r["name"] for r in scores["rows"]]
  assert names[0] == scores["model"]["name"] == "demo_smoke (joint latent)"
  assert [r["kind"] for r in scores["rows"]] == ["samples", "latent model", "reconstructions"]
  assert names[1] == "demo_smoke (per_dim latent)"     # eval.latent_models of configs/demo.py
  for name in names:
    assert f"| {name} |" in report, name
  rec = scores["rows"][-1]["reconstruction"]
  assert rec["mse"] > 0 and np.isfinite(rec["psnr"]) and "PSNR" in report
  for f in ("latent_per_dim.npz", "eval/real_row.json"):
    assert os.path.exists(os.path.join(workdir, f)), f
  assert not os.path.exists(os.path.join(workdir, "latent_rotated.npz"))
  # Running again skips every finished stage and changes nothing.
  before = len(read_metrics(workdir))
  stamp = os.path.getmtime(os.path.join(workdir, "eval", "metrics.json"))
  r = _main("--config=configs/demo.py:smoke", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-4000:]
  assert "evaluate: current" in r.stderr and len(read_metrics(workdir)) == before
  assert os.path.getmtime(os.path.join(workdir, "eval", "metrics.json")) == stamp
  # --mode=evaluate re-scores on request, without training anything.
  os.remove(os.path.join(workdir, "eval", "report.md"))
  r = _main("--config=configs/demo.py:smoke", f"--workdir={workdir}", "--mode=evaluate",
            "--verbosity=1")
  assert r.returncode == 0, r.stderr[-4000:]
  assert ORBAX_INFO.search(r.stderr)     # the libraries' INFO lines on request
  assert os.path.exists(os.path.join(workdir, "eval", "report.md"))
  assert "real row: reusing" in r.stderr     # the real set is scored once
  assert len(read_metrics(workdir)) == before


def test_own_nifti_folder_with_hcp_smoke(tmp_path):
  config = load_config("hcp64", "smoke")
  config.data.root = write_nifti_folder(str(tmp_path / "data"))
  workdir = str(tmp_path / "w")
  pipeline.run(config, workdir, "preprocess")
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  pipeline.run(config, workdir, "all")
  vol = nib.load(os.path.join(workdir, "samples", "sample_0000.nii.gz"))
  assert vol.shape == (32, 32, 32)
  np.testing.assert_allclose(vol.header.get_zooms(), [config.data.voxel_size] * 3, rtol=1e-5)


def test_bad_mode_key_and_data_errors(tmp_path):
  r = _main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}", "--mode=evaluat",
            timeout=120)
  assert r.returncode == 2 and r.stderr.startswith("error: flag --mode=evaluat"), r.stderr
  r = _main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
            "--config.train.num_stepz=3", timeout=120)
  assert r.returncode == 2 and "error: no such config key 'num_stepz'" in r.stderr, r.stderr
  assert 'Did you mean "num_steps"' in r.stderr and "Traceback" not in r.stderr
  # An override of the wrong type, a config file that is not there: one line each, exit 2.
  r = _main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
            "--config.train.num_steps=1.5", timeout=120)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      "error: flag --config.train.num_steps=1.5: invalid literal for int() with base 10: "
      "'1.5' (see --help)"], r.stderr
  r = _main("--config=configs/nope.py", f"--workdir={tmp_path}", timeout=120)
  assert r.returncode == 2 and "error: --config: cannot load the config file" in r.stderr
  assert "nope.py" in r.stderr and "Traceback" not in r.stderr
  config = load_config("hcp64", "smoke")
  with pytest.raises(ConfigError, match="data.root"):
    pipeline.run(config, str(tmp_path / "a"))
  config.data.root = str(tmp_path / "nowhere")
  with pytest.raises(DataError, match="nowhere"):
    pipeline.run(config, str(tmp_path / "b"))
  os.makedirs(tmp_path / "empty")
  config.data.root = str(tmp_path / "empty")
  with pytest.raises(DataError, match="empty"):
    pipeline.run(config, str(tmp_path / "c"))


def test_changed_model_under_checkpoints_is_refused(tmp_path):
  config = load_config("hcp64", "smoke")
  config.data.root = write_nifti_folder(str(tmp_path / "data"), n=4)
  workdir = str(tmp_path / "w")
  config.train.num_steps = 2
  pipeline.run(config, workdir, "train")
  config.model.base_width = 8
  with pytest.raises(ConfigError, match="model"):
    pipeline.run(config, workdir, "train")
