"""Evaluation stage: RAS ordering, segmenter FD, metrics.json/report.md, NIfTI folders, errors."""

import os
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from helpers import make_cache, tiny_config
from slicevae_jax import fileio
from slicevae_jax.data import nifti
from slicevae_jax.errors import DataError
from slicevae_jax.eval import evaluate, segmenter
from slicevae_jax.eval import report as report_lib
from slicevae_jax.metrics import frechet, mmd, ras

GRID = 32   # MS-SSIM's five scales need >= 32 voxels per axis


def _config():
  c = tiny_config(grid=GRID)
  s = c.segmenter
  s.widths, s.num_steps, s.batch_size = (8, 16), 120, 16
  s.log_every, s.eval_every, s.checkpoint_every = 40, 120, 120
  s.progress, s.num_eval_volumes = False, 1
  e = c.eval
  e.num_real, e.mmd_batch, e.mmd_repeats, e.msssim_pairs, e.msssim_batch = 4, 2, 3, 2, 2
  e.reg_levels, e.reg_iters, e.reg_lr, e.pair_batch = 2, (20, 10), 0.02, 4
  e.num_figures = 2
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 32³ labelled cache (4 train, 4 val) and a segmenter trained 120 steps in its workdir."""
  root = tmp_path_factory.mktemp("eval")
  workdir = str(root / "w")
  cache = make_cache(os.path.join(workdir, "cache"), num=8, grid=GRID, num_val=4)
  config = _config()
  seg = segmenter.ensure_segmenter(config, workdir, cache)
  return config, workdir, cache, seg


def _real(cache):
  val = cache.split("val")
  return (np.stack([cache.volume(i) for i in val]),
          np.stack([cache.label_volume(i) for i in val]))


def _noise(n, seed=0):
  return np.random.default_rng(seed).random((n, GRID, GRID, GRID)).astype(np.float32)


def test_ras_real_vs_real_beats_noise(trained):
  config, _, cache, (model, variables) = trained
  real, labels = _real(cache)
  segment = lambda v: segmenter.segment_volumes(model, variables, v, cache.slice_axis)
  kw = dict(pair_batch=4, **evaluate.registration_settings(config.eval))
  upper = ras.ras_real_vs_real(real[:2], real[2:], labels[2:], segment, 3, **kw)
  noise = ras.realistic_atlas_score(_noise(2), real[2:], labels[2:], segment, 3, **kw)
  assert upper["dice"].shape == noise["dice"].shape == (2, 2, 3)
  assert np.isnan(upper["per_label"][0])             # background excluded
  assert upper["ras"] > 0.5, upper["ras"]
  assert upper["ras"] > noise["ras"] + 0.25, (upper["ras"], noise["ras"])


def test_frechet_distance_self_zero_and_grows_with_shift():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8))
  assert frechet.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
  # Fewer volumes than dimensions: singular covariances still give ~0 for the same set.
  assert frechet.frechet_distance(a[:5], a[:5]) == pytest.approx(0.0, abs=1e-8)
  near = frechet.frechet_distance(a, a + 0.1)
  far = frechet.frechet_distance(a, a + 1.0)
  assert 0.0 < near < far
  assert far == pytest.approx(8.0, rel=1e-6)         # a pure shift adds ‖Δμ‖² = 8 · 1²


def test_segmenter_features_and_fd(trained):
  _, _, cache, (model, variables) = trained
  real, _ = _real(cache)
  f = segmenter.segmenter_features(model, variables, real, cache.slice_axis, slabs=2)
  assert f.shape == (4, 2 * 16) and np.all(np.isfinite(f))
  out = segmenter.segmenter_frechet_distance(model, variables, real, _noise(4),
                                             cache.slice_axis)
  same = frechet.frechet_distance(out["features_a"], out["features_a"])
  assert out["fd"] > same + 1e-3 and same == pytest.approx(0.0, abs=1e-6)


def test_evaluate_volumes_writes_metrics_report_and_pictures(trained, tmp_path):
  config, _, cache, seg = trained
  real, labels = _real(cache)
  names = cache.manifest["label_names"]
  # 'Generated': training volumes (a perfect model) and noise, to exercise both ends.
  train = np.stack([cache.volume(i) for i in cache.split("train")[:3]])
  out = str(tmp_path / "eval")
  res = evaluate.evaluate_volumes(config, train, real, labels, seg, names, cache.slice_axis,
                                  out, name="ours")
  row, real_row = res["model"], res["real"]
  for key in ("mmd_kwon", "mmd_gaussian", "ms_ssim", "ms_ssim_kwon", "ras", "segmenter_fd"):
    assert key in row, key
  assert row["mmd_kwon"]["batch"] == 2 and row["mmd_kwon"]["repeats"] == 3
  assert set(row["ras"]["per_label"]) == {"dark", "bright"}
  assert 0.0 <= real_row["ms_ssim"]["mean"] <= 1.0 and real_row["ras"]["mean"] > 0.5
  metrics = fileio.read_json(os.path.join(out, "metrics.json"))
  assert metrics["model"]["ras"]["mean"] == pytest.approx(row["ras"]["mean"])
  report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
  assert "| Model | MMD (Kwon) ↓ | MS-SSIM ↓ | MS-SSIM (Kwon) ↓ | RAS ↑" in report
  assert "\n| ours | " in report and "\n| Real | — | " in report
  for png in ("ras_per_label.png", "overlay_ours.png", "samples_ours.png"):
    assert os.path.getsize(os.path.join(out, png)) > 1000, png
    assert png in report

  noisy = evaluate.evaluate_volumes(config, _noise(3), real, labels, seg, names,
                                    cache.slice_axis, str(tmp_path / "noise"), name="noise")
  assert noisy["model"]["ras"]["mean"] < row["ras"]["mean"]
  assert noisy["model"]["mmd_kwon"]["mean"] > row["mmd_kwon"]["mean"]
  assert noisy["model"]["segmenter_fd"]["value"] > row["segmenter_fd"]["value"]
  # Several models in one report (the baselines' comparison).
  path = report_lib.write_report([row, noisy["model"]], real_row, out, label_names=names)
  text = open(path, encoding="utf-8").read()
  assert "\n| ours | " in text and "\n| noise | " in text


def _write(folder, name, data, affine=np.diag([2.0, 2.0, 2.0, 1.0])):
  os.makedirs(folder, exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data), affine), os.path.join(folder, name))


def test_evaluate_folders(trained, tmp_path):
  config, workdir, cache, _ = trained
  real, labels = _real(cache)
  gen_dir, real_dir, lab_dir = (str(tmp_path / d) for d in ("gen", "real", "labels"))
  for i, i_train in enumerate(cache.split("train")[:2]):
    # Another model's output range: [-1, 1] -> rescaled by min/max.
    _write(gen_dir, f"g{i}.nii.gz", 2.0 * cache.volume(i_train) - 1.0)
  for i in range(len(real)):
    _write(real_dir, f"r{i}.nii.gz", real[i])
    _write(lab_dir, f"r{i}.nii.gz", labels[i].astype(np.int16))
  out = str(tmp_path / "out")
  res = evaluate.evaluate_folders(config, gen_dir, real_dir, lab_dir, workdir, out)
  assert res["model"]["name"] == "gen" and res["model"]["num_generated"] == 2
  assert res["model"]["ras"]["mean"] > 0.5
  assert os.path.exists(os.path.join(out, "metrics.json"))
  assert os.path.exists(os.path.join(out, "report.md"))

  # The same segmenter read from a model bundle, which has no cache: the same scores.
  bundle = tmp_path / "bundle"
  shutil.copytree(os.path.join(workdir, "segmenter"), bundle / "segmenter")
  fileio.write_json(str(bundle / "bundle.json"), {"label_names": cache.label_names()})
  again = evaluate.evaluate_folders(config, gen_dir, real_dir, lab_dir, str(bundle),
                                    str(tmp_path / "out_bundle"))
  assert again["model"]["ras"]["mean"] == pytest.approx(res["model"]["ras"]["mean"])
  fileio.write_json(str(bundle / "bundle.json"), {"label_names": None})
  with pytest.raises(DataError, match="bundle has no labelled RAS segmenter"):
    evaluate.evaluate_folders(config, gen_dir, real_dir, lab_dir, str(bundle), out)

  # Bad input, each error names the file or folder at fault.
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with pytest.raises(DataError, match="empty.*no generated volumes"):
    evaluate.evaluate_folders(config, empty, real_dir, lab_dir, workdir, out)
  with pytest.raises(DataError, match="nowhere.*does not exist"):
    evaluate.evaluate_folders(config, str(tmp_path / "nowhere"), real_dir, lab_dir, workdir, out)
  small = str(tmp_path / "small")
  _write(small, "s0.nii.gz", np.zeros((24, GRID, GRID), np.float32) + 0.5)
  with pytest.raises(DataError, match=r"small/s0\.nii\.gz.*\(24, 32, 32\).*real/r0\.nii\.gz"):
    evaluate.evaluate_folders(config, small, real_dir, lab_dir, workdir, out)
  os.remove(os.path.join(lab_dir, "r2.nii.gz"))
  with pytest.raises(DataError, match=r"labels/r2\.nii\.gz: missing label map"):
    evaluate.evaluate_folders(config, gen_dir, real_dir, lab_dir, workdir, out)


def test_evaluate_workdir(trained, tmp_path):
  config, workdir, cache, _ = trained
  unlabelled = make_cache(str(tmp_path / "c"), num=3, grid=GRID, num_val=1, labels=False)
  with pytest.raises(DataError, match="no labels"):
    evaluate.evaluate_workdir(config, str(tmp_path / "w"), unlabelled)
  with pytest.raises(DataError, match="samples.*run --mode=sample"):
    evaluate.evaluate_workdir(config, workdir, cache)
  # The sample stage's output: NIfTI files plus samples.json.
  samples = os.path.join(workdir, "samples")
  for i, j in enumerate(cache.split("train")[:2]):
    nifti.save_volume(os.path.join(samples, f"sample_{i:04d}.nii.gz"), cache.volume(j),
                      cache.affine(j))
  fileio.write_json(os.path.join(samples, "samples.json"), {"checkpoint_step": 3})
  assert not evaluate.is_current(workdir)
  res = evaluate.evaluate_workdir(config, workdir, cache)   # segmenter done: not retrained
  assert res["model"]["num_generated"] == 2 and res["model"]["ras"]["mean"] > 0.5
  for f in ("metrics.json", "report.md", "ras_per_label.png"):
    assert os.path.exists(os.path.join(workdir, "eval", f)), f
  assert evaluate.is_current(workdir)
  # A comparison report elsewhere links the figures back to eval/.
  path = report_lib.write_report([res["model"]], res["real"], str(tmp_path / "cmp"))
  assert "../" in open(path, encoding="utf-8").read()


def test_cli_reports_bad_input(tmp_path):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "slicevae_jax.evaluate", f"--config={repo}/configs/demo.py:smoke",
       f"--generated={empty}", f"--real={empty}", f"--labels={empty}",
       f"--segmenter_workdir={tmp_path}", f"--out={tmp_path / 'out'}"],
      cwd=repo, capture_output=True, text=True, timeout=120, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"error: {empty}: no generated volumes" in proc.stderr


def test_kwon_mmd_without_spread_is_flagged_not_reported_as_zero_std():
  rng = np.random.default_rng(0)
  real = rng.random((4, 8, 8, 8)).astype(np.float32)
  gen = rng.random((4, 8, 8, 8)).astype(np.float32)
  # N = M = B: every pass compares the same two sets.
  fixed = mmd.kwon_mmd_protocol(real, gen, key=jax.random.key(0), batch=4, repeats=5)
  row = evaluate._kwon_row(fixed, 4, 5, n=4, m=4)
  assert row["degenerate"] and row["std"] == pytest.approx(0.0, abs=1e-9)
  assert "no spread" in report_lib.table_markdown([{"name": "m", "mmd_kwon": row}], None)
  # Twice as many real volumes as a batch: passes differ, the spread is a measurement.
  real2 = np.concatenate([real, rng.random((4, 8, 8, 8)).astype(np.float32)])
  varied = mmd.kwon_mmd_protocol(real2, gen, key=jax.random.key(0), batch=4, repeats=5)
  row = evaluate._kwon_row(varied, 4, 5, n=4, m=8)
  assert not row["degenerate"] and row["std"] > 0
  assert "±" in report_lib.table_markdown([{"name": "m", "mmd_kwon": row}], None)


def test_report_warns_about_labels_the_segmenter_misses(tmp_path):
  row = {"name": "m", "ras": {"mean": 0.5, "per_label": {"gm": 0.6, "wm": 0.7, "tiny": 0.4}}}
  real = {"name": "Real", "ras": {"mean": 0.8, "per_label": {"gm": 0.9, "wm": 0.9, "tiny": 0.6}}}
  names = ["background", "gm", "wm", "tiny"]
  text = open(report_lib.write_report([row], real, str(tmp_path / "ok"), label_names=names),
              encoding="utf-8").read()
  assert report_lib.missed_labels(real) == [] and "misses" not in text
  real["ras"]["per_label"]["tiny"] = 0.0          # found by no real-vs-real pair
  real["ras"]["per_label"]["wm"] = None           # absent from every volume: not a miss
  assert report_lib.missed_labels(real) == ["tiny"]
  text = open(report_lib.write_report([row], real, str(tmp_path / "miss"), label_names=names),
              encoding="utf-8").read()
  assert "The RAS segmenter misses 1 label(s) on real volumes**: tiny" in text
  assert report_lib.missed_labels(None) == []
