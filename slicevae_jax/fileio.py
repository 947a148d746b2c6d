"""Atomic file writes: every output of every stage lands complete or not at all.

A file is written to a temporary name in the same folder, flushed and fsynced,
then renamed over the destination (rename is atomic on POSIX filesystems), so an
interrupted run never leaves a half-written cache, latent file, NIfTI or PNG.
"""

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np


def _file_mode() -> int:
  """The mode a plain open() would give a new file now (mkstemp gives 0600)."""
  try:  # Linux: read the umask without changing it (os.umask is not thread-safe).
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return 0o666 & ~int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path`; renames it onto `path` on success.

  `suffix` lets writers that pick their format from the file name (nibabel,
  matplotlib) see the right extension.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=folder, prefix="." + os.path.basename(path) + ".", suffix=suffix + ".tmp"
  )
  os.close(fd)
  os.chmod(tmp, _file_mode())
  if suffix:
    # Writers such as nibabel choose the format from the final extension.
    os.replace(tmp, tmp[: -len(".tmp")])
    tmp = tmp[: -len(".tmp")]
  try:
    yield tmp
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(folder)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _fsync_file(path: str) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def _fsync_dir(folder: str) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
  """np.savez, atomically. `path` should end in .npz."""
  with atomic_path(path, suffix=".npz") as tmp:
    np.savez(tmp, **arrays)


def read_json(path: str | os.PathLike) -> Any:
  with open(path, "r", encoding="utf-8") as f:
    return json.load(f)


def json_default(obj: Any) -> Any:
  """`json.dumps(default=...)` for numpy and JAX values: scalars as numbers, arrays as lists."""
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, "__array__"):                                # numpy and jax arrays
    return np.asarray(obj).tolist()
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
