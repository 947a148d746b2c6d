"""Label sets: FreeSurfer codes and the embedded atlas grouped into the paper's 15 classes.

Where it sits: preprocessing (real aseg / aparc+aseg label maps) and the embedded default data
set (the CerebrA atlas) both write label maps in this one class set, so the RAS segmenter,
the evaluation and the report see the same 15 classes whatever the data (paper §3.3).
"""

import numpy as np


FREESURFER15_NAMES = (
    "background", "cerebellum_gm", "cerebellum_wm", "cerebral_gm", "cerebral_wm",
    "thalamus", "hippocampus", "amygdala", "ventricles", "caudate", "putamen",
    "pallidum", "ventral_dc", "csf", "brainstem",
)

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
