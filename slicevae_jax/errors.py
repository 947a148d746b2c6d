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


def parse_flags(argv: Sequence[str]) -> list[str]:
  """app.run's flags_parser: a flag that cannot be read (unknown key, wrong type) ends the
  command like any other bad input, one 'error: ...' line and exit 2."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in str(e):
      # A config file that fails to load (an unknown ':variant', a missing file) comes
      # wrapped, traceback and all: keep the flag and the exception's own line.
      flag = lines[0].split(": Error whilst", 1)[0]
      last = lines[-1]
      if last.startswith(__name__ + "."):
        last = last.split(": ", 1)[-1]
      print(f"error: {flag}: {last}", file=sys.stderr)
    else:
      print(f"error: {e} (see --help)", file=sys.stderr)
  except (AttributeError, KeyError) as e:
    # ml_collections' answer to --config.<key>=... for a key the config lacks; the
    # innermost message names it and suggests the closest.
    inner = e
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    text = " ".join(str(inner).split())
    print(f"error: no such config key {text} (overrides are --config.<key>=<value>)",
          file=sys.stderr)
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
