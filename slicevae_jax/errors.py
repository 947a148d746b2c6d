"""Error types raised on bad input at any stage; every message names the file or key at fault.

main.py turns them into one `error: ...` line and exit code 2.
"""


class SliceVAEError(Exception):
  """Base class for errors this package raises on purpose."""


class DataError(SliceVAEError, ValueError):
  """A data file or folder cannot be used (missing, corrupt, wrong shape, NaNs)."""


class ConfigError(SliceVAEError, ValueError):
  """A configuration key or value is unknown or out of range."""


class NonFiniteLossError(SliceVAEError, FloatingPointError):
  """Training produced a non-finite loss; the last good checkpoint is kept."""
