"""NIfTI I/O: round trips keep world coordinates; bad files give errors naming the file."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from slicevae_jax.data import nifti
from slicevae_jax.errors import DataError


def _oblique_flipped_affine() -> np.ndarray:
  """A non-RAS affine: axes permuted and flipped, rotated 10°, anisotropic voxels."""
  t = np.deg2rad(10.0)
  rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
  perm_flip = np.array([[0, -1, 0], [0, 0, 1], [-1, 0, 0]], float)  # roughly PSL-ish
  a = np.eye(4)
  a[:3, :3] = rot @ perm_flip @ np.diag([1.2, 1.5, 2.0])
  a[:3, 3] = [30.0, -12.5, 7.25]
  return a


def _world_by_value(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """World coordinates [N, 3] of voxels ordered by their (unique) value."""
  idx = np.stack(np.unravel_index(np.argsort(data, axis=None), data.shape), axis=1)
  return nib.affines.apply_affine(affine, idx)


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_round_trip_keeps_world_coordinates(tmp_path, name):
  data = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
  affine = _oblique_flipped_affine()
  path = tmp_path / name
  nifti.save_volume(path, data, affine)
  assert sorted(os.listdir(tmp_path)) == [name]  # no temporary file left behind

  raw, raw_affine = nifti.load_volume(path, canonical=False)
  np.testing.assert_array_equal(raw, data)
  np.testing.assert_allclose(raw_affine, affine, atol=1e-4)

  can, can_affine = nifti.load_volume(path)
  assert can.dtype == np.float32 and sorted(can.shape) == sorted(data.shape)
  assert nib.aff2axcodes(can_affine) == ("R", "A", "S")
  # Every voxel value sits at the same world position before and after reorienting.
  np.testing.assert_allclose(_world_by_value(can, can_affine), _world_by_value(data, affine),
                             atol=1e-3)

  header = nib.load(path).header
  np.testing.assert_allclose(header.get_zooms(), nifti.voxel_sizes(affine), rtol=1e-5)
  assert int(header["sform_code"]) > 0 and int(header["qform_code"]) > 0
  np.testing.assert_allclose(nifti.voxel_sizes(affine), [1.2, 1.5, 2.0])


def test_lps_file_loads_as_ras(tmp_path):
  data = np.random.default_rng(0).permutation(5 * 6 * 7).reshape(5, 6, 7).astype(np.float32)
  lps = np.diag([-1.0, -1.0, 1.0, 1.0])
  lps[:3, 3] = [10.0, 20.0, -5.0]
  path = tmp_path / "lps.nii.gz"
  nifti.save_volume(path, data, lps)
  ras, ras_affine = nifti.load_volume(path)
  assert nib.aff2axcodes(lps) == ("L", "P", "S")
  assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
  np.testing.assert_allclose(np.diag(ras_affine)[:3], [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(ras, data[::-1, ::-1, :])
  np.testing.assert_allclose(_world_by_value(ras, ras_affine), _world_by_value(data, lps))


def test_labels_round_trip_and_checks(tmp_path):
  labels = np.random.default_rng(1).integers(0, 2036, (6, 5, 4)).astype(np.int32)
  affine = np.diag([-2.0, 2.0, 2.0, 1.0])
  path = tmp_path / "aseg.nii.gz"
  nifti.save_volume(path, labels, affine, dtype=np.int16)
  got, got_affine = nifti.load_labels(path)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, labels[::-1])
  assert nib.aff2axcodes(got_affine) == ("R", "A", "S")

  nifti.save_volume(tmp_path / "float_ok.nii", labels.astype(np.float32), affine)
  np.testing.assert_array_equal(nifti.load_labels(tmp_path / "float_ok.nii")[0], labels[::-1])

  nifti.save_volume(tmp_path / "frac.nii", labels + 0.5, affine)
  with pytest.raises(DataError, match=r"frac\.nii.*non-integer"):
    nifti.load_labels(tmp_path / "frac.nii")


def test_trailing_singleton_dimension_is_squeezed(tmp_path):
  data = np.random.default_rng(2).random((4, 5, 6, 1)).astype(np.float32)
  nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one.nii")
  got, _ = nifti.load_volume(tmp_path / "one.nii")
  np.testing.assert_array_equal(got, data[..., 0])


def test_bad_files_name_the_file(tmp_path):
  good = tmp_path / "good.nii.gz"
  nifti.save_volume(good, np.ones((8, 8, 8)), np.eye(4))
  blob = good.read_bytes()

  cases = {}
  cases["missing.nii"] = (None, "does not exist")
  (tmp_path / "trunc.nii.gz").write_bytes(blob[: len(blob) // 2])
  cases["trunc.nii.gz"] = (None, "cannot read")
  (tmp_path / "text.nii").write_text("not an image\n" * 20)
  cases["text.nii"] = (None, "cannot read")
  (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"\x00" * 10))
  cases["garbage.nii.gz"] = (None, "cannot read")
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii")
  cases["4d.nii"] = (None, r"4D with shape \(4, 4, 4, 3\)")
  nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "2d.nii")
  cases["2d.nii"] = (None, "2 dimensions")
  nan = np.ones((4, 4, 4), np.float32)
  nan[0, 0, :3] = np.nan
  nan[1, 1, 1] = np.inf
  nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii")
  cases["nan.nii"] = (None, "4 non-finite")
  for name, (_, message) in cases.items():
    path = str(tmp_path / name)
    for loader in (nifti.load_volume, nifti.load_labels):
      with pytest.raises(DataError, match=message) as err:
        loader(path)
      assert path in str(err.value), (name, str(err.value))
  with pytest.raises(DataError, match="not a file"):
    nifti.load_volume(tmp_path)


def test_save_rejects_bad_names_and_shapes(tmp_path):
  with pytest.raises(DataError, match=r"\.nii or \.nii\.gz"):
    nifti.save_volume(tmp_path / "x.npy", np.zeros((2, 2, 2)), np.eye(4))
  with pytest.raises(DataError, match="3D"):
    nifti.save_volume(tmp_path / "x.nii", np.zeros((2, 2)), np.eye(4))
  assert not os.listdir(tmp_path)
