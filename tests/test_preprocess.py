"""Real-data preprocessing: geometry invariants, label grouping, errors, build_cache end to end."""

import os
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from slicevae_jax import config_lib
from slicevae_jax.data import intensity, nifti, preprocess
from slicevae_jax.data import labels as label_sets
from slicevae_jax.data import subjects as subjects_lib
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import DataError

SHAPE = (28, 30, 26)
SPACING = 1.5
LANDMARK = (17, 12, 15)  # input voxel of the bright spot


def _brain(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
  """A skull-stripped-like volume (zero border planes) and FreeSurfer-coded labels."""
  rng = np.random.default_rng(seed)
  c = [np.arange(n) - (n - 1) / 2 for n in shape]
  x, y, z = np.meshgrid(*c, indexing="ij")
  r = np.sqrt((x / 10) ** 2 + (y / 11) ** 2 + (z / 9) ** 2)
  img = np.where(r < 1, 60 + 20 * rng.random(shape), 0.0).astype(np.float32)
  img[r < 0.4] = 30.0
  aseg = np.where(r < 0.7, 2, np.where(r < 1, 3, 0))            # 2 = WM, 3 = cortex
  aseg = np.where(r < 0.4, 4, aseg).astype(np.int32)           # 4 = lateral ventricle
  aseg[(r < 1) & (x > 6)] = 1001                               # a cortical parcel
  return img, aseg


def _ras_affine(origin=(-20.0, -22.0, -18.0)) -> np.ndarray:
  a = np.diag([SPACING] * 3 + [1.0])
  a[:3, 3] = origin
  return a


def _config(root, **data):
  c = config_lib.base_config()
  c.seed = 3
  d = c.data
  d.root = str(root)
  d.grid = 16
  d.voxel_size = 3.0
  d.num_val = 1
  d.num_workers = 1
  for k, v in data.items():
    d[k] = v
  return config_lib.validate(c)


# --------------------------------------------------------------------------
# preprocess_volume
# --------------------------------------------------------------------------


@pytest.mark.parametrize("antialias", [True, False])
def test_landmark_lands_at_same_world_position(tmp_path, antialias):
  img, _ = _brain(0)
  img[LANDMARK[0] - 1:LANDMARK[0] + 2, LANDMARK[1] - 1:LANDMARK[1] + 2,
      LANDMARK[2] - 1:LANDMARK[2] + 2] = 500.0
  # Stored LPS and loaded canonical, as real data would be.
  lps = np.diag([-SPACING, -SPACING, SPACING, 1.0])
  lps[:3, 3] = [25.0, 30.0, -10.0]
  nifti.save_volume(tmp_path / "s.nii.gz", img, lps)
  data, affine = nifti.load_volume(tmp_path / "s.nii.gz")

  out, labels, grid_affine = preprocess.preprocess_volume(
      data, affine, grid=16, voxel_size=3.0, percentiles=(1.0, 99.9), antialias=antialias)
  assert out.shape == (16, 16, 16) and out.dtype == np.float32 and labels is None
  assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.5
  np.testing.assert_allclose(nifti.voxel_sizes(grid_affine), [3.0] * 3)
  assert nib.aff2axcodes(grid_affine) == ("R", "A", "S")

  want = nib.affines.apply_affine(lps, LANDMARK)
  got = nib.affines.apply_affine(grid_affine, np.unravel_index(np.argmax(out), out.shape))
  assert np.linalg.norm(got - want) <= 3.0 * np.sqrt(3) / 2 + 1e-6, (got, want)


def test_unscaled_axes_copy_voxels_and_grid_is_centred():
  img, _ = _brain(1)
  affine = _ras_affine()
  # Same spacing in and out: an integer shift, so voxels are copied exactly.
  out, _, grid_affine = preprocess.preprocess_volume(
      img, affine, grid=32, voxel_size=SPACING, percentiles=(0.0, 100.0))
  shift = np.linalg.solve(affine, grid_affine)  # output index -> input index
  np.testing.assert_allclose(shift[:3, :3], np.eye(3), atol=1e-9)
  offset = shift[:3, 3]
  np.testing.assert_allclose(offset, np.round(offset), atol=1e-9)
  norm = intensity.normalize_percentiles(img, (0.0, 100.0))
  idx = np.argwhere(out > 0)
  np.testing.assert_allclose(out[tuple(idx.T)], norm[tuple((idx + offset).astype(int).T)],
                             atol=1e-6)
  # The grid centre is the centre of the non-zero bounding box (to half a voxel).
  nz = np.argwhere(img != 0)
  box_centre = nib.affines.apply_affine(affine, (nz.min(0) + nz.max(0)) / 2)
  grid_centre = nib.affines.apply_affine(grid_affine, [15.5] * 3)
  assert np.all(np.abs(grid_centre - box_centre) <= SPACING / 2 + 1e-9)


def test_upsampling_and_padding_are_zero_outside():
  img, _ = _brain(2, shape=(12, 14, 10))
  out, _, grid_affine = preprocess.preprocess_volume(
      img, _ras_affine(), grid=32, voxel_size=1.0)
  assert out.shape == (32,) * 3
  # The input spans 12 x 14 x 10 voxels of 1.5 mm; the 32 mm grid is bigger, zero padded.
  assert out[0].max() == 0 and out[-1].max() == 0 and out[:, :, 0].max() == 0
  np.testing.assert_allclose(nifti.voxel_sizes(grid_affine), [1.0] * 3)


def test_labels_nearest_keep_input_values_and_overlay_image():
  img, _ = _brain(3)
  labels = np.zeros(SHAPE, np.uint8)
  labels[img > 0] = 3
  labels[img == 30.0] = 7
  labels[18:22, 10:14, 8:12] = 200
  labels[img == 0] = 0
  out, out_labels, _ = preprocess.preprocess_volume(
      img, _ras_affine(), grid=16, voxel_size=2.0, labels=labels)
  assert out_labels.dtype == np.uint8 and out_labels.shape == (16,) * 3
  assert set(np.unique(out_labels)) == {0, 3, 7, 200}
  # Labels and image were resampled with the same geometry.
  assert (out[out_labels == 0] < 0.2).mean() > 0.9
  assert np.all(out[out_labels == 3] > 0)

  with pytest.raises(DataError, match="shape"):
    preprocess.preprocess_volume(img, _ras_affine(), grid=16, voxel_size=2.0,
                                 labels=labels[:-1])
  with pytest.raises(DataError, match="all zeros"):
    preprocess.preprocess_volume(np.zeros(SHAPE), _ras_affine(), grid=16, voxel_size=2.0)


def test_n4_reduces_a_smooth_bias_and_runs_in_the_pipeline():
  img, _ = _brain(4, shape=(32, 32, 32))
  flat = np.where(img > 0, 100.0, 0.0).astype(np.float32)
  x = np.linspace(-1, 1, 32)[:, None, None]
  biased = flat * np.exp(0.4 * x)
  fg = flat > 0
  corrected = preprocess.n4_correct(biased, _ras_affine(), shrink=2, iterations=(20, 20))
  assert corrected.dtype == np.float32 and np.all(corrected[~fg] == 0)

  def cv(v):
    return v[fg].std() / v[fg].mean()

  assert cv(corrected) < 0.5 * cv(biased)
  out, _, _ = preprocess.preprocess_volume(biased, _ras_affine(), grid=16, voxel_size=3.0,
                                           n4=True)
  assert out.shape == (16,) * 3 and 0 <= out.min() and out.max() <= 1


# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------


def test_group_freesurfer_labels():
  names = label_sets.FREESURFER15_NAMES
  assert len(names) == 15 and names[0] == "background"
  cls = {n: i for i, n in enumerate(names)}
  expect = {
      0: "background", 2: "cerebral_wm", 41: "cerebral_wm", 77: "cerebral_wm",
      251: "cerebral_wm", 3: "cerebral_gm", 42: "cerebral_gm", 1001: "cerebral_gm",
      2035: "cerebral_gm", 8: "cerebellum_gm", 47: "cerebellum_gm", 7: "cerebellum_wm",
      46: "cerebellum_wm", 10: "thalamus", 49: "thalamus", 17: "hippocampus",
      53: "hippocampus", 18: "amygdala", 54: "amygdala", 4: "ventricles", 43: "ventricles",
      14: "ventricles", 15: "ventricles", 31: "ventricles", 11: "caudate", 26: "caudate",
      58: "caudate", 12: "putamen", 51: "putamen", 13: "pallidum", 52: "pallidum",
      28: "ventral_dc", 60: "ventral_dc", 24: "csf", 16: "brainstem",
      30: "background", 62: "background", 80: "background", 999: "background",
  }
  codes = np.array(list(expect), np.int32).reshape(-1, 1, 1)
  got = label_sets.group_freesurfer_labels(codes)
  assert got.dtype == np.uint8 and got.shape == codes.shape
  for code, g in zip(expect, got.ravel()):
    assert g == cls[expect[code]], (code, names[g], expect[code])

  with pytest.raises(DataError, match="uint8"):
    label_sets.map_labels(np.array([0, 300]), "none", "x.nii")
  np.testing.assert_array_equal(label_sets.map_labels(np.array([0, 5]), "none"), [0, 5])


# --------------------------------------------------------------------------
# Finding subjects
# --------------------------------------------------------------------------


def _write_flat(root, n, labels_dir=None, seed=0):
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    img, aseg = _brain(seed + i)
    nifti.save_volume(os.path.join(root, f"sub{i:02d}.nii.gz"), img, _ras_affine())
    if labels_dir:
      os.makedirs(labels_dir, exist_ok=True)
      nifti.save_volume(os.path.join(labels_dir, f"sub{i:02d}.nii.gz"), aseg, _ras_affine(),
                        dtype=np.int16)


def _write_hcp(root, n, labels=True):
  for i in range(n):
    img, aseg = _brain(10 + i)
    folder = os.path.join(root, f"1000{i}", "T1w")
    os.makedirs(folder)
    # Stored LPS like many scanners' output; loading makes it RAS.
    lps = np.diag([-SPACING, -SPACING, SPACING, 1.0])
    nifti.save_volume(os.path.join(folder, "T1w_acpc_dc_restore_brain.nii.gz"), img, lps)
    if labels:
      nifti.save_volume(os.path.join(folder, "aparc+aseg.nii.gz"), aseg, lps, dtype=np.int16)


def test_find_subjects_layouts(tmp_path):
  flat = tmp_path / "flat"
  _write_flat(flat, 2, labels_dir=tmp_path / "labels")
  (flat / "notes.txt").write_text("ignored")
  subs = subjects_lib.find_subjects(flat, labels_dir=str(tmp_path / "labels"))
  assert [s.id for s in subs] == ["sub00", "sub01"]
  assert subs[0].labels == str(tmp_path / "labels" / "sub00.nii.gz")
  assert subjects_lib.find_subjects(flat, "flat")[0].labels is None

  hcp = tmp_path / "hcp"
  _write_hcp(hcp, 2)
  os.makedirs(hcp / "not_a_subject")
  subs = subjects_lib.find_subjects(hcp)
  assert [s.id for s in subs] == ["10000", "10001"]
  assert subs[1].labels.endswith(os.path.join("10001", "T1w", "aparc+aseg.nii.gz"))
  assert subjects_lib.find_subjects(hcp, "hcp", hcp_labels="")[0].labels is None


def test_find_subjects_errors_name_the_folder(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(DataError, match="does not exist") as e:
    subjects_lib.find_subjects(missing)
  assert str(missing) in str(e.value)
  (tmp_path / "file.nii").write_text("x")
  with pytest.raises(DataError, match="not a folder"):
    subjects_lib.find_subjects(tmp_path / "file.nii")
  empty = tmp_path / "empty"
  os.makedirs(empty)
  for layout, pattern in (("auto", r"\*\.nii"), ("flat", r"\*\.nii"),
                          ("hcp", "T1w_acpc_dc_restore_brain")):
    with pytest.raises(DataError, match="no volumes found") as e:
      subjects_lib.find_subjects(empty, layout)
    assert str(empty) in str(e.value) and layout in str(e.value)
    assert re.search(pattern, str(e.value))
  with pytest.raises(DataError, match="labels folder"):
    subjects_lib.find_subjects(tmp_path, labels_dir=str(tmp_path / "nolabels"))


# --------------------------------------------------------------------------
# build_cache
# --------------------------------------------------------------------------


def test_build_cache_flat_skips_corrupt_subject(tmp_path):
  root = tmp_path / "flat"
  _write_flat(root, 4, labels_dir=tmp_path / "labels")
  bad = root / "sub02.nii.gz"
  blob = bad.read_bytes()
  bad.write_bytes(blob[: len(blob) // 2])
  config = _config(root, labels_dir=str(tmp_path / "labels"), num_workers=2)
  cache = preprocess.build_cache(config, str(tmp_path / "cache"))

  m = cache.manifest
  assert [s["id"] for s in m["skipped"]] == ["sub02"]
  assert str(bad) in m["skipped"][0]["reason"]
  assert len(cache) == 3 and m["num_rows"] == 4
  assert m["label_names"] == list(label_sets.FREESURFER15_NAMES) and m["source"] == "nifti"
  splits = [s["split"] for s in m["subjects"]] + [s["split"] for s in m["skipped"]]
  assert splits.count("val") == 1 and splits.count("train") == 3
  for i in range(len(cache)):
    vol = cache.volume(i)
    assert vol.shape == (16,) * 3 and 0 <= vol.min() and vol.max() <= 1 and vol.max() > 0.5
    np.testing.assert_allclose(nifti.voxel_sizes(cache.affine(i)), [3.0] * 3)
    labels = cache.label_volume(i)
    # aseg codes 0, 2, 3, 4, 1001 -> background, WM, GM, ventricles.
    assert set(np.unique(labels)) <= {0, 3, 4, 8}
    assert cache.subjects[i]["shape_in"] == list(SHAPE)
    np.testing.assert_allclose(cache.subjects[i]["voxel_size_in"], [SPACING] * 3)

  with pytest.raises(DataError, match="sub02.nii.gz"):
    preprocess.build_cache(_config(root, labels_dir=str(tmp_path / "labels"), strict=True),
                           str(tmp_path / "cache_strict"))


@pytest.mark.parametrize("kind", ["truncated", "text", "4d", "nan"])
def test_bad_subject_errors_name_the_file(tmp_path, kind):
  root = tmp_path / "data"
  _write_flat(root, 2)
  bad = root / ("bad.nii.gz" if kind == "truncated" else "bad.nii")
  if kind == "truncated":
    blob = (root / "sub00.nii.gz").read_bytes()
    bad.write_bytes(blob[: len(blob) // 3])
  elif kind == "text":
    bad.write_text("this is not a NIfTI file\n" * 30)
  elif kind == "4d":
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), bad)
  else:
    v = np.ones((8, 8, 8), np.float32)
    v[2, 3, 4] = np.nan
    nib.save(nib.Nifti1Image(v, np.eye(4)), bad)
  message = {"truncated": "cannot read", "text": "cannot read", "4d": "4D with shape",
             "nan": "1 non-finite"}[kind]
  with pytest.raises(DataError, match=message) as e:
    preprocess.build_cache(_config(root, strict=True), str(tmp_path / "cache"))
  assert str(bad) in str(e.value)
  cache = preprocess.build_cache(_config(root), str(tmp_path / "cache"))
  assert [s["id"] for s in cache.manifest["skipped"]] == ["bad"]
  assert message.split()[-1] in cache.manifest["skipped"][0]["reason"]


def test_build_cache_hcp_layout_and_existing_cache(tmp_path, monkeypatch):
  root = tmp_path / "hcp"
  _write_hcp(root, 3)
  config = _config(root, num_val=5)
  cache = preprocess.build_cache(config, str(tmp_path / "cache"))
  assert len(cache) == 3 and not cache.manifest["skipped"]
  assert len(cache.split("val")) == 2 and len(cache.split("train")) == 1  # capped at n - 1
  assert cache.labels is not None
  assert set(np.unique(cache.label_volume(0))) <= {0, 3, 4, 8}
  # Loaded LPS files give RAS grid affines.
  assert nib.aff2axcodes(cache.affine(0)) == ("R", "A", "S")

  calls = []
  real = preprocess._process_subject
  monkeypatch.setattr(preprocess, "_process_subject",
                      lambda task: calls.append(task["row"]) or real(task))
  again = preprocess.build_cache(config, str(tmp_path / "cache"))
  assert calls == [] and again.path == cache.path
  preprocess.build_cache(config, str(tmp_path / "cache"), overwrite=True)
  assert calls == [0, 1, 2]

  # One subject leaves nothing to hold out: refused before any work, nothing written.
  with pytest.raises(DataError, match="1 subject found; at least 2"):
    preprocess.build_cache(_config(root, max_subjects=1, num_val=5), str(tmp_path / "c1"))
  assert not os.path.exists(tmp_path / "c1") and not os.path.exists(tmp_path / "c1.partial")


def test_build_cache_resumes_after_interruption(tmp_path, monkeypatch):
  root = tmp_path / "flat"
  _write_flat(root, 4)
  config = _config(root)
  real = preprocess._process_subject
  calls = []

  def interrupted(task):
    if len(calls) == 2:
      raise KeyboardInterrupt  # the run dies after two subjects
    calls.append(task["row"])
    return real(task)

  monkeypatch.setattr(preprocess, "_process_subject", interrupted)
  with pytest.raises(KeyboardInterrupt):
    preprocess.build_cache(config, str(tmp_path / "cache"))
  assert not VolumeCache.exists(str(tmp_path / "cache"))
  assert os.path.isdir(str(tmp_path / "cache") + ".partial")

  calls.clear()
  monkeypatch.setattr(preprocess, "_process_subject",
                      lambda task: calls.append(task["row"]) or real(task))
  cache = preprocess.build_cache(config, str(tmp_path / "cache"))
  assert calls == [2, 3]
  assert len(cache) == 4 and not cache.manifest["skipped"]
  full = preprocess.build_cache(config, str(tmp_path / "fresh"))
  for i in range(4):
    np.testing.assert_array_equal(cache.volume(i), full.volume(i))
  assert [s["split"] for s in cache.subjects] == [s["split"] for s in full.subjects]


def test_csv_list_picks_subjects_and_fixes_the_split(tmp_path):
  data = tmp_path / "my data"                        # relative paths, a space in the folder
  _write_flat(data / "img", 4, labels_dir=data / "lab")
  listing = data / "subjects.csv"
  listing.write_text("path, labels, split\n"
                     "img/sub03.nii.gz, lab/sub03.nii.gz, val\n"
                     "img/sub00.nii.gz, lab/sub00.nii.gz, train\n"
                     "\n"
                     "img/sub02.nii.gz, lab/sub02.nii.gz, train\n")   # sub01 left out
  cache = preprocess.build_cache(_config(listing, num_val=0), str(tmp_path / "cache"))
  assert [s["id"] for s in cache.subjects] == ["sub03", "sub00", "sub02"]
  assert [s["split"] for s in cache.subjects] == ["val", "train", "train"]
  assert cache.labels is not None and cache.manifest["layout"] == "auto"
  # Without a split column the seeded split applies; no labels column, no labels.
  listing.write_text("path\nimg/sub00.nii.gz\nimg/sub01.nii.gz\nimg/sub02.nii.gz\n")
  subjects = subjects_lib.find_subjects(str(listing))
  assert [(s.id, s.labels, s.split) for s in subjects] == [
      (f"sub0{i}", None, None) for i in range(3)]
  # One file name in several folders: the ids are the paths as written.
  listing.write_text("path\na/t1.nii.gz\nb/t1.nii.gz\nc.nii\n")
  assert [s.id for s in subjects_lib.find_subjects(str(listing))] == ["a/t1", "b/t1", "c"]

  bad = {"file,split\nimg/sub00.nii.gz,train\n": "header must name the column 'path'",
         "path,split\nimg/sub00.nii.gz,test\nimg/sub01.nii.gz,val\n": "line 2: split is 'test'",
         "path\nimg/sub00.nii.gz\nimg/sub00.nii.gz\n": "also on line 2",
         "path\n\n": "no rows",
         "path\nimg/sub00.txt\n": "not a .nii or .nii.gz file",
         "path\n": "no rows"}
  for text, message in bad.items():
    listing.write_text(text)
    with pytest.raises(DataError, match=message) as e:
      subjects_lib.find_subjects(str(listing))
    assert str(listing) in str(e.value)
  listing.write_text("path,split\nimg/sub00.nii.gz,train\nimg/sub01.nii.gz,train\n")
  with pytest.raises(DataError, match="no row has split 'val'"):
    preprocess.build_cache(_config(listing), str(tmp_path / "c2"))


def test_labels_only_when_every_subject_has_them(tmp_path):
  root = tmp_path / "flat"
  _write_flat(root, 3, labels_dir=tmp_path / "labels")
  os.remove(tmp_path / "labels" / "sub01.nii.gz")
  # labels_dir given: a missing label file fails that subject, naming the file.
  cache = preprocess.build_cache(_config(root, labels_dir=str(tmp_path / "labels")),
                                 str(tmp_path / "c1"))
  assert [s["id"] for s in cache.manifest["skipped"]] == ["sub01"]
  assert "labels" in cache.manifest["skipped"][0]["reason"]
  assert cache.labels is not None

  # HCP: labels are optional per subject; mixed -> no labels (or an error when strict).
  hcp = tmp_path / "hcp"
  _write_hcp(hcp, 2)
  os.remove(hcp / "10001" / "T1w" / "aparc+aseg.nii.gz")
  cache = preprocess.build_cache(_config(hcp), str(tmp_path / "c2"))
  assert cache.labels is None and cache.manifest["label_names"] is None and len(cache) == 2
  with pytest.raises(DataError, match="1 of 2 subjects have label files"):
    preprocess.build_cache(_config(hcp, strict=True), str(tmp_path / "c3"))


def test_raw_labels_get_numbered_names(tmp_path):
  root = tmp_path / "flat"
  labels_dir = tmp_path / "labels"
  _write_flat(root, 2)
  os.makedirs(labels_dir)
  for i in range(2):
    lab = np.zeros(SHAPE, np.uint8)
    lab[8:20, 8:20, 8:18] = 5
    nifti.save_volume(labels_dir / f"sub{i:02d}.nii.gz", lab, _ras_affine(), dtype=np.uint8)
  cache = preprocess.build_cache(_config(root, labels_dir=str(labels_dir), label_map="none"),
                                 str(tmp_path / "cache"))
  assert cache.manifest["label_names"] == [f"label_{i}" for i in range(6)]
  assert set(np.unique(cache.label_volume(0))) == {0, 5}


def test_preprocess_module_does_not_import_jax():
  code = ("import sys, slicevae_jax.data.preprocess; "
          "sys.exit(1 if 'jax' in sys.modules else 0)")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert subprocess.run([sys.executable, "-c", code], cwd=repo, check=False).returncode == 0


def _write_bids(root, derivatives=None):
  """sub-01 with two sessions, sub-02 with two runs and no session, sub-03, sub-04."""
  files = ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
           "sub-02/anat/sub-02_run-1_T1w.nii.gz", "sub-02/anat/sub-02_run-2_T1w.nii",
           "sub-03/anat/sub-03_T1w.nii.gz", "sub-04/anat/sub-04_T1w.nii.gz"]
  for i, rel in enumerate(files):
    img, aseg = _brain(20 + i)
    os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
    nifti.save_volume(os.path.join(root, rel), img, _ras_affine())
    if derivatives:
      entities = os.path.basename(rel).split("_T1w")[0]
      seg = os.path.join(derivatives, os.path.dirname(rel), f"{entities}_desc-aseg_dseg.nii.gz")
      os.makedirs(os.path.dirname(seg), exist_ok=True)
      nifti.save_volume(seg, aseg, _ras_affine(), dtype=np.int16)
  # Not T1w volumes of the dataset: ignored.
  os.makedirs(os.path.join(root, "sub-03", "func"))
  nifti.save_volume(os.path.join(root, "sub-03", "func", "sub-03_bold.nii.gz"), img,
                    _ras_affine())
  nifti.save_volume(os.path.join(root, "sub-03", "anat", "sub-03_T2w.nii.gz"), img, _ras_affine())
  (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
  return files


def test_bids_layout_sessions_runs_and_derivative_labels(tmp_path):
  root, deriv = tmp_path / "bids", tmp_path / "bids" / "derivatives" / "freesurfer"
  _write_bids(root, deriv)
  subs = subjects_lib.find_subjects(root, labels_dir=str(deriv))       # 'auto' finds BIDS
  assert [(s.id, s.group) for s in subs] == [
      ("sub-01_ses-1", "sub-01"), ("sub-01_ses-2", "sub-01"), ("sub-02_run-1", "sub-02"),
      ("sub-02_run-2", "sub-02"), ("sub-03", "sub-03"), ("sub-04", "sub-04")]
  assert subs[1].labels == str(deriv / "sub-01" / "ses-2" / "anat" /
                               "sub-01_ses-2_desc-aseg_dseg.nii.gz")
  assert subjects_lib.find_subjects(root, "bids")[0].labels is None
  # Two segmentations of one volume: refused unless data.bids_desc picks one.
  other = deriv / "sub-03" / "anat" / "sub-03_desc-synthseg_dseg.nii.gz"
  other.write_bytes((deriv / "sub-03" / "anat" / "sub-03_desc-aseg_dseg.nii.gz").read_bytes())
  with pytest.raises(DataError, match="2 segmentations match sub-03.*data.bids_desc"):
    subjects_lib.find_subjects(root, labels_dir=str(deriv))
  picked = subjects_lib.find_subjects(root, labels_dir=str(deriv), bids_desc="synthseg")
  assert picked[4].labels == str(other)
  with pytest.raises(DataError, match="no segmentation matches a T1w volume"):
    subjects_lib.find_subjects(root, labels_dir=str(tmp_path))
  empty = tmp_path / "empty"
  os.makedirs(empty / "sub-05" / "anat")
  with pytest.raises(DataError, match=r"layout 'bids': looked for <root>/sub-\*"):
    subjects_lib.find_subjects(empty, "bids")

  # The cache keeps each participant's sessions and runs in one split.
  os.remove(other)
  cache = preprocess.build_cache(_config(root, labels_dir=str(deriv), num_val=2),
                                 str(tmp_path / "cache"))
  assert len(cache) == 6 and cache.labels is not None
  split_of = {}
  for s in cache.subjects:
    split_of.setdefault(s["participant"], set()).add(s["split"])
  assert all(len(v) == 1 for v in split_of.values())
  assert len(cache.split("val")) >= 2 and len(cache.split("train")) >= 1


def test_split_by_groups_equals_the_plain_split_without_groups():
  for num, num_val, seed in [(10, 3, 0), (7, 6, 1), (5, 0, 2), (64, 16, 0)]:
    plain = preprocess.split_subjects(num, num_val, seed)
    assert preprocess.split_subjects(num, num_val, seed, [f"s{i}" for i in range(num)]) == plain
    assert plain.count("val") == min(num_val, num - 1)
  # Two groups of five: at least 3 held out means a whole group, and one stays to train.
  split = preprocess.split_subjects(10, 3, 0, ["a"] * 5 + ["b"] * 5)
  assert len(set(split[:5])) == 1 and len(set(split[5:])) == 1
  assert split.count("val") == 5 and split.count("train") == 5
  assert preprocess.split_subjects(10, 9, 0, ["a"] * 5 + ["b"] * 5).count("train") == 5
