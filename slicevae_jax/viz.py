"""Pictures for the training grids, the samples and the report: slices and volumes -> PNG."""

import numpy as np

from slicevae_jax import fileio


def to_uint8(image: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
  x = (np.asarray(image, np.float32) - lo) / max(hi - lo, 1e-12)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
  """Tiles rows of equal-size 2D images ([n, H, W] each) into one uint8 picture."""
  n = max(len(r) for r in rows)
  h, w = rows[0].shape[1:3]
  out = np.zeros((len(rows) * (h + pad) + pad, n * (w + pad) + pad), np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y:y + h, x:x + w] = to_uint8(img)
  return out


def three_planes(volume: np.ndarray) -> np.ndarray:
  """Sagittal, coronal and axial mid-slices of a RAS [X, Y, Z] volume, side by side.

  Each plane is shown in radiological-free display convention: superior up,
  anterior right in the sagittal view, left-right as stored otherwise.
  """
  x, y, z = (s // 2 for s in volume.shape)
  sag = np.rot90(volume[x, :, :])        # [Z, Y], superior up
  cor = np.rot90(volume[:, y, :])        # [Z, X]
  axi = np.rot90(volume[:, :, z])        # [Y, X], anterior up
  h = max(p.shape[0] for p in (sag, cor, axi))
  planes = [np.pad(p, ((0, h - p.shape[0]), (0, 2))) for p in (sag, cor, axi)]
  return to_uint8(np.concatenate(planes, axis=1))


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend, imported on first use (it is slow)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a 2D uint8 (or [0,1] float) image as a grey PNG, atomically."""
  plt = pyplot()
  img = image if image.dtype == np.uint8 else to_uint8(image)
  with fileio.atomic_path(path, suffix=".png") as tmp:
    plt.imsave(tmp, img, cmap="gray", vmin=0, vmax=255, format="png")
