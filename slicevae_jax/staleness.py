"""Is a stage's output still current? Its recorded inputs vs the config's, for skip and resume.

Each output that `--mode=all` may reuse records what it was made from: the
cache in its manifest, the latent fit in its file's meta (`fit_inputs`), the
samples in `samples.json`. The stage compares that record with the values the
current config and files give, here, and redoes (or refuses) what changed.
"""

import hashlib
import json
import os
from typing import Any

from absl import logging


def _canonical(value: Any) -> str:
  # JSON text, so a tuple in the config equals the list read back from a file.
  return json.dumps(value, sort_keys=True, default=str)


def changes(recorded: dict[str, Any], wanted: dict[str, Any]
            ) -> tuple[list[str], list[str]]:
  """(keys of `wanted` whose recorded value differs, keys of `wanted` not recorded)."""
  changed = [k for k in wanted if k in recorded
             and _canonical(recorded[k]) != _canonical(wanted[k])]
  missing = [k for k in wanted if k not in recorded]
  return changed, missing


def _describe(recorded: dict[str, Any], wanted: dict[str, Any], keys: list[str]) -> str:
  """'key: recorded -> wanted, ...' for the given keys ('not recorded' where absent)."""
  return ", ".join(f"{k}: {recorded[k] if k in recorded else 'not recorded'!s} -> {wanted[k]}"
                   for k in keys)


def stale(what: str, recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """Keys of `wanted` that `recorded` lacks or holds otherwise; logs them at INFO as stale.

  For outputs that are cheap to redo: an unrecorded input counts as changed.
  """
  changed, missing = changes(recorded, wanted)
  keys = [k for k in wanted if k in changed or k in missing]
  if keys:
    logging.info("%s is stale (%s)", what, _describe(recorded, wanted, keys))
  return keys


def file_sha256(path: str | os.PathLike) -> str | None:
  """Hex SHA-256 of a file's bytes (None if it does not exist); read in 1 MiB blocks."""
  if not os.path.exists(path):
    return None
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
