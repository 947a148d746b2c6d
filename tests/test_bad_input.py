"""Bad input a user can give, refused with one line naming the file and the problem.

Tiny synthetic NIfTI files, no training: each case checks the error (or warning), that
nothing half-written is left behind, and, for two of them, the exit through main.
"""

import errno
import fcntl
import logging as py_logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import blob_volume, load_config
from slicevae_jax import pipeline
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data import nifti, preprocess
from slicevae_jax.data import subjects as subjects_lib
from slicevae_jax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


def _brain(seed: int = 0) -> np.ndarray:
  """A 32³ ellipsoid 'brain' (29-41 mm across at 1.5 mm: above the 22 mm minimum), float32."""
  return blob_volume(32, np.random.default_rng(seed)) * 80.0


def _save(path, data, affine=AFFINE, orientation=True) -> str:
  img = nib.Nifti1Image(data, affine)
  if not orientation:
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  nib.save(img, str(path))
  return str(path)


def _folder(path, n=3, labels_dir=None) -> str:
  """n brains (and FreeSurfer-coded label maps: 2 = WM, 3 = cortex) in a flat folder."""
  for i in range(n):
    v = _brain(i)
    _save(os.path.join(path, f"sub{i}.nii.gz"), v)
    if labels_dir:
      lab = np.where(v > 60, 2, np.where(v > 0, 3, 0)).astype(np.int16)
      _save(os.path.join(labels_dir, f"sub{i}.nii.gz"), lab)
  return str(path)


def _config(root, **data):
  c = load_config("hcp64", "smoke")          # 32³ at 5.6 mm: a 179 mm field of view
  c.data.root = str(root)
  c.data.num_val = 1
  c.data.num_workers = 1
  for k, v in data.items():
    c.data[k] = v
  return c


def _nothing_written(cache: str) -> bool:
  return not os.path.exists(cache) and not os.path.exists(cache + ".partial")


def test_complex_nifti_is_refused(tmp_path):
  path = _save(tmp_path / "c.nii.gz", (_brain() * (1 + 1j)).astype(np.complex64))
  with pytest.raises(DataError, match="complex-valued") as e:
    nifti.load_volume(path)
  assert path in str(e.value)


def test_missing_orientation_warns_or_is_refused_under_strict(tmp_path, caplog):
  root = _folder(tmp_path / "data", 3)
  guessed = _save(os.path.join(root, "sub1.nii.gz"), _brain(1), orientation=False)
  assert not nifti.orientation_known(guessed) and nifti.orientation_known(
      os.path.join(root, "sub0.nii.gz"))
  cache = str(tmp_path / "strict")
  with pytest.raises(DataError, match="neither qform nor sform") as e:
    preprocess.build_cache(_config(root, strict=True), cache)
  assert guessed in str(e.value)
  with caplog.at_level(py_logging.WARNING):
    built = preprocess.build_cache(_config(root), str(tmp_path / "lenient"))
  assert len(built) == 3
  assert any("orientation" in r.getMessage() and guessed in r.getMessage()
             for r in caplog.records)


def test_implausibly_small_brain_names_its_size(tmp_path):
  root = _folder(tmp_path / "data", 2)
  tiny = _save(os.path.join(root, "tiny.nii.gz"), np.ones((4, 4, 4), np.float32),
               np.eye(4))
  with pytest.raises(DataError, match=r"brain extent 4.0 x 4.0 x 4.0 mm .* field of view "
                                      r"of 179 mm") as e:
    preprocess.build_cache(_config(root, strict=True), str(tmp_path / "cache"))
  assert tiny in str(e.value)


@pytest.mark.parametrize("problem", ["grid", "affine", "codes"])
def test_label_map_problems(tmp_path, problem):
  labels = str(tmp_path / "labels")
  root = _folder(tmp_path / "data", 3, labels_dir=labels)
  bad = os.path.join(labels, "sub2.nii.gz")
  lab = nib.load(bad).get_fdata().astype(np.int16)
  if problem == "grid":
    _save(bad, lab[:-2])
  elif problem == "affine":
    _save(bad, lab, np.diag([1.5, 1.5, 1.6, 1.0]))
  else:
    _save(bad, np.where(lab > 0, 500, 0).astype(np.int16))  # not FreeSurfer codes
  message = {"grid": "label map grid", "affine": "label map affine differs",
             "codes": "outside the data.label_map='freesurfer15' grouping"}[problem]
  cache = str(tmp_path / "cache")
  with pytest.raises(DataError, match=message) as e:
    preprocess.build_cache(_config(root, labels_dir=labels, strict=True), cache)
  assert bad in str(e.value)


def test_labels_folder_matching_no_image(tmp_path):
  root = _folder(tmp_path / "data", 2)
  _folder(tmp_path / "other", 2)
  labels = str(tmp_path / "labels")
  os.makedirs(labels)
  for i in range(2):
    os.symlink(os.path.join(tmp_path, "other", f"sub{i}.nii.gz"),
               os.path.join(labels, f"aseg{i}.nii.gz"))
  with pytest.raises(DataError, match="no label file matches an image") as e:
    subjects_lib.find_subjects(root, labels_dir=labels)
  assert labels in str(e.value) and "sub0.nii.gz" in str(e.value)


def test_every_subject_skipped_or_empty_validation_split(tmp_path):
  root = str(tmp_path / "data")
  for i in range(3):
    _save(os.path.join(root, f"c{i}.nii.gz"), (_brain(i) * 1j).astype(np.complex64))
  cache = str(tmp_path / "cache")
  with pytest.raises(DataError, match="every one of the 3 subjects was skipped") as e:
    preprocess.build_cache(_config(root), cache)
  assert "complex-valued" in str(e.value) and _nothing_written(cache)
  # Only the held-out subject is bad: training would go on with no validation set.
  root2 = _folder(tmp_path / "data2", 3)
  config = _config(root2)
  val = preprocess.split_subjects(3, 1, config.seed).index("val")
  _save(os.path.join(root2, f"sub{val}.nii.gz"), (_brain() * 1j).astype(np.complex64))
  with pytest.raises(DataError, match="validation split is empty.*data.num_val"):
    preprocess.build_cache(config, cache)
  assert _nothing_written(cache)
  with pytest.raises(ConfigError, match="data.num_val"):
    preprocess.build_cache(_config(root2, num_val=0), cache)


def test_unwritable_workdir_keeps_the_checkpoints(tmp_path, monkeypatch):
  # Tests run as root, where chmod does not stop writes: the file system's answer is faked.
  workdir = tmp_path / "w"
  step = workdir / "checkpoints" / "4"
  step.mkdir(parents=True)
  (step / "state").write_bytes(b"weights")
  config = _config(_folder(tmp_path / "data", 2))

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(workdir))
  monkeypatch.setattr(workdir_lib.tempfile, "mkstemp", read_only)
  with pytest.raises(DataError, match="cannot write to the workdir .Read-only file system"):
    pipeline.run(config, str(workdir))
  monkeypatch.undo()

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(workdir / "cache" / "x.npy"))
  monkeypatch.setattr(pipeline, "prepare_cache", full)
  with pytest.raises(DataError, match=r"x.npy: cannot write \(No space left on device\); "
                                      r"the finished checkpoints are intact \(newest: step 4\)"):
    pipeline.run(config, str(workdir))
  assert (step / "state").read_bytes() == b"weights"


def test_a_second_run_on_a_busy_workdir_refuses(tmp_path):
  workdir = tmp_path / "w"
  config = _config(_folder(tmp_path / "data", 2))
  os.makedirs(workdir)
  # Another run holds the lock (as `workdir_lock` does, here from this test process).
  fd = os.open(workdir / workdir_lib.LOCK_FILE, os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    with pytest.raises(DataError, match="another run is using this workdir .process 4242"):
      pipeline.run(config, str(workdir), "preprocess")
    assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_FILE]   # nothing else touched
  finally:
    os.close(fd)
  pipeline.run(config, str(workdir), "preprocess")                # free again: runs


def _main(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "slicevae_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_bad_input_through_main_is_one_line_and_exit_2(tmp_path):
  root = str(tmp_path / "my data")               # a path with a space, too
  _folder(root, 2)
  bad = _save(os.path.join(root, "c.nii.gz"), (_brain() * 1j).astype(np.complex64))
  workdir = tmp_path / "w"
  r = _main("--config=configs/hcp64.py:smoke", f"--config.data.root={root}",
            "--config.data.strict=True", f"--workdir={workdir}")
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert bad in errors[0] and "complex-valued" in errors[0]
  assert "Traceback" not in r.stderr
  assert not os.path.exists(workdir / "cache")
