"""Error types raised on bad input; every message names the file or key at fault."""

import sys
from typing import Callable, NoReturn, Sequence


class SliceVAEError(Exception):
  """Base class for errors this package raises on purpose."""


class DataError(SliceVAEError, ValueError):
  """A data file or folder cannot be used (missing, corrupt, wrong shape, NaNs)."""


class ConfigError(SliceVAEError, ValueError):
  """A configuration key or value is unknown or out of range."""


class NonFiniteLossError(SliceVAEError, FloatingPointError):
  """Training produced a non-finite loss; the last good checkpoint is kept."""


def exit_with(err: SliceVAEError) -> NoReturn:
  """Command-line ending for an expected error: one 'error: ...' line on stderr, exit 2.

  The error is also logged when absl writes a log file (--log_dir), so the file says
  why the run stopped; on a terminal the log line would only repeat the error line.
  """
  from absl import logging  # pylint: disable=import-outside-toplevel
  if getattr(logging.get_absl_handler().python_handler, "stream", sys.stderr) is not sys.stderr:
    logging.error("%s: %s", type(err).__name__, err)
  print(f"error: {err}", file=sys.stderr)
  sys.exit(2)


def run_command(argv: Sequence[str], body: Callable[[], None]) -> None:
  """The shared body of every command line: no stray arguments, quiet logs, clean exits.

  `body` does the work; an expected error (SliceVAEError) ends the process via `exit_with`.
  Logs: the project's INFO lines, other libraries' only with --verbosity=1 (see logs.py).
  """
  from absl import app  # pylint: disable=import-outside-toplevel
  from slicevae_jax import logs  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  logs.configure()
  try:
    body()
  except SliceVAEError as err:
    exit_with(err)
