"""Label maps -> the paper's 15 classes (FreeSurfer codes, the CerebrA atlas), at preprocessing.

Where it sits: preprocessing (real aseg / aparc+aseg label maps, `map_labels`) and the
embedded default data set (the CerebrA atlas, `cerebra_lookup`) both write label maps in
this one class set, so the RAS segmenter, the evaluation and the report see the same 15
classes whatever the data (paper §3.3).
"""

import csv
import os

import numpy as np

from slicevae_jax.errors import DataError


FREESURFER15_NAMES = (
    "background", "cerebellum_gm", "cerebellum_wm", "cerebral_gm", "cerebral_wm",
    "thalamus", "hippocampus", "amygdala", "ventricles", "caudate", "putamen",
    "pallidum", "ventral_dc", "csf", "brainstem",
)
FREESURFER15_INDEX = {name: i for i, name in enumerate(FREESURFER15_NAMES)}

# (class index, FreeSurfer codes); ranges are inclusive. See group_freesurfer_labels.
_FS15_TABLE: tuple[tuple[int, tuple[int | tuple[int, int], ...]], ...] = (
    (1, (8, 47)),                                        # cerebellum cortex
    (2, (7, 46)),                                        # cerebellum white matter
    (3, (3, 42, (1000, 1035), (2000, 2035),              # cerebral cortex, aparc
         (1100, 1199), (2100, 2199),                     # aparc.a2005s
         (11100, 11199), (12100, 12199))),               # aparc.a2009s
    (4, (2, 41, 77, 78, 79, 85, (155, 162), (251, 255),  # WM, hypointensities, chiasm,
         (3000, 3035), (4000, 4035), 5001, 5002)),       # int. capsule, CC, wmparc
    (5, (9, 10, 48, 49)),                                # thalamus (old and new codes)
    (6, (17, 53)),                                       # hippocampus
    (7, (18, 54)),                                       # amygdala
    (8, (4, 5, 14, 15, 43, 44, 31, 63, 72)),             # ventricles + choroid plexus
    (9, (11, 50, 26, 58)),                               # caudate + accumbens
    (10, (12, 51)),                                      # putamen
    (11, (13, 52)),                                      # pallidum
    (12, (28, 60)),                                      # ventral DC
    (13, (24,)),                                         # CSF
    (14, (16,)),                                         # brainstem
)


def _fs15_class(code: int) -> int:
  for cls, codes in _FS15_TABLE:
    for c in codes:
      if (isinstance(c, tuple) and c[0] <= code <= c[1]) or code == c:
        return cls
  return 0


def group_freesurfer_labels(aseg: np.ndarray) -> np.ndarray:
  """Groups FreeSurfer aseg / aparc+aseg codes into the 15 classes of FREESURFER15_NAMES.

  ==  ==============  =======================================================
  0   background      every code not listed below (incl. vessels 30/62,
                      non-WM hypointensities 80, optic nerve, unknown)
  1   cerebellum_gm   8, 47
  2   cerebellum_wm   7, 46
  3   cerebral_gm     3, 42; cortical parcels 1000–1035, 2000–2035 (aparc),
                      1100–1199, 2100–2199 (a2005s), 11100–11199, 12100–12199
                      (a2009s)
  4   cerebral_wm     2, 41; WM hypointensities 77, 78, 79; optic chiasm 85;
                      internal capsule / (un)myelinated WM 155–162; corpus
                      callosum 251–255; wmparc 3000–3035, 4000–4035, 5001, 5002
  5   thalamus        9, 10, 48, 49
  6   hippocampus     17, 53
  7   amygdala        18, 54
  8   ventricles      lateral 4, 43; inferior lateral 5, 44; 3rd 14; 4th 15;
                      5th 72; choroid plexus 31, 63 (it lies inside the
                      ventricles and is too small to be a class of its own)
  9   caudate         11, 50 and accumbens 26, 58 (accumbens is a few voxels at
                      64³ and continuous with the caudate head, as in the paper's
                      15-class list which has no accumbens class)
  10  putamen         12, 51
  11  pallidum        13, 52
  12  ventral_dc      28, 60
  13  csf             24
  14  brainstem       16
  ==  ==============  =======================================================

  Args:
    aseg: integer codes, any shape.
  Returns:
    uint8 array of the same shape with values in [0, 14].
  """
  aseg = np.asarray(aseg)
  # Look up each distinct code once: a volume has ~100 distinct codes, ~10⁷ voxels.
  codes, inverse = np.unique(aseg, return_inverse=True)
  lut = np.array([_fs15_class(int(c)) for c in codes], np.uint8)
  return lut[inverse].reshape(aseg.shape)


def map_labels(labels: np.ndarray, label_map: str, path: str = "") -> np.ndarray:
  """Applies `data.label_map` ('freesurfer15' | 'none') to raw integer labels -> uint8."""
  if label_map == "none":
    if labels.size and (labels.min() < 0 or labels.max() > 255):
      raise DataError(f"{path}: label values span [{labels.min()}, {labels.max()}], which "
                      f"does not fit uint8; use data.label_map='freesurfer15' for FreeSurfer "
                      f"codes or relabel to 0..255")
    return labels.astype(np.uint8)
  return _check_grouped(labels, group_freesurfer_labels(labels), path)


# More than this share of the labelled (non-zero) voxels falling to background under
# 'freesurfer15' means the codes are not FreeSurfer's (a real aseg loses only vessels,
# lesions and the like, well under 1 %).
MAX_UNGROUPED_FRACTION = 0.5


def _check_grouped(raw: np.ndarray, grouped: np.ndarray, path: str) -> np.ndarray:
  """Refuses label codes outside the 'freesurfer15' map; returns `grouped`."""
  if raw.size and raw.min() < 0:
    raise DataError(f"{path}: label map has negative values (min {raw.min()}), which are no "
                    f"FreeSurfer codes (data.label_map='freesurfer15')")
  labelled = raw != 0
  lost = labelled & (grouped == 0)
  num_labelled = int(np.count_nonzero(labelled))
  if num_labelled and np.count_nonzero(lost) > MAX_UNGROUPED_FRACTION * num_labelled:
    codes, counts = np.unique(raw[lost], return_counts=True)
    top = codes[np.argsort(-counts)][:8].tolist()
    raise DataError(
        f"{path}: {np.count_nonzero(lost) / num_labelled:.0%} of the labelled voxels have "
        f"codes outside the data.label_map='freesurfer15' grouping (most common: {top}); "
        f"give a FreeSurfer aseg/aparc+aseg, or set data.label_map='none' for labels "
        f"already numbered 0..255")
  return grouped


# ---------------------------------------------------------------------------------------------
# CerebrA (the embedded default's atlas, data/synth.py).

# CerebrA label names (lower case) of the non-cortical structures -> class. As in the FreeSurfer
# grouping, every ventricle is one class and the accumbens joins the caudate.
_SUBCORTICAL = {
    "lateral ventricle": "ventricles",
    "inferior lateral ventricle": "ventricles",
    "third ventricle": "ventricles",
    "fourth ventricle": "ventricles",
    "cerebellum white matter": "cerebellum_wm",
    "cerebellum gray matter": "cerebellum_gm",
    "thalamus": "thalamus",
    "caudate": "caudate",
    "accumbens area": "caudate",
    "putamen": "putamen",
    "pallidum": "pallidum",
    "brainstem": "brainstem",
    "hippocampus": "hippocampus",
    "amygdala": "amygdala",
    "ventral diencephalon": "ventral_dc",
    "basal forebrain": "ventral_dc",
    "optic chiasm": "ventral_dc",
}
_VERMIS_PREFIX = "vermal lobules"  # 'Vermal lobules I-V', 'VI-VII', 'VIII-X'
# The Desikan-Killiany cortical parcels CerebrA keeps (Mindboggle's 31), plus the insula.
_CORTICAL = frozenset({
    "caudal anterior cingulate", "caudal middle frontal", "cuneus", "entorhinal",
    "fusiform", "inferior parietal", "inferior temporal", "isthmus cingulate",
    "lateral occipital", "lateral orbitofrontal", "lingual", "medial orbitofrontal",
    "middle temporal", "parahippocampal", "paracentral", "pars opercularis",
    "pars orbitalis", "pars triangularis", "pericalcarine", "postcentral",
    "posterior cingulate", "precentral", "precuneus", "rostral anterior cingulate",
    "rostral middle frontal", "superior frontal", "superior parietal",
    "superior temporal", "supramarginal", "transverse temporal", "insula",
})
NUM_CEREBRA_LABELS = 102


def cerebra_lookup(csv_path) -> np.ndarray:
  """uint8 [256] table CerebrA voxel value -> class index of `FREESURFER15_NAMES`.

  Built from the atlas's label table by structure name, so a renumbered atlas
  still groups right; a name the grouping does not know is an error rather
  than a silent background.
  """
  lut = np.full(256, 255, np.uint8)
  lut[0] = 0
  with open(os.fspath(csv_path), "r", encoding="utf-8-sig", newline="") as f:
    rows = [r for r in csv.DictReader(f) if (r.get("Label Name") or "").strip()]
  for row in rows:
    name = " ".join(row["Label Name"].lower().split())
    if name in _CORTICAL:
      cls = "cerebral_gm"
    elif name.startswith(_VERMIS_PREFIX):
      cls = "cerebellum_gm"
    elif name in _SUBCORTICAL:
      cls = _SUBCORTICAL[name]
    else:
      raise DataError(f"{csv_path}: CerebrA label {row['Label Name']!r} has no class in "
                      "the synthetic label grouping")
    for column in ("RH Label", "LH Labels"):
      lut[int(row[column])] = FREESURFER15_INDEX[cls]
  missing = [v for v in range(1, NUM_CEREBRA_LABELS + 1) if lut[v] == 255]
  if missing:
    raise DataError(f"{csv_path}: CerebrA labels {missing} are not in the label table")
  return lut
