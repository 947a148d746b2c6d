"""Error types raised on bad input; every message names the file or key at fault."""

import sys
from typing import NoReturn


class SliceVAEError(Exception):
  """Base class for errors this package raises on purpose."""


class DataError(SliceVAEError, ValueError):
  """A data file or folder cannot be used (missing, corrupt, wrong shape, NaNs)."""


class ConfigError(SliceVAEError, ValueError):
  """A configuration key or value is unknown or out of range."""


class NonFiniteLossError(SliceVAEError, FloatingPointError):
  """Training produced a non-finite loss; the last good checkpoint is kept."""


def exit_with(err: SliceVAEError) -> NoReturn:
  """Command-line ending for an expected error: one log line, the message on stderr, exit 2."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.error("%s: %s", type(err).__name__, err)
  print(f"error: {err}", file=sys.stderr)
  sys.exit(2)
