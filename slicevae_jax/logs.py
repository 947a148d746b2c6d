"""Which log lines the command prints: set once, by main.py, before any stage runs.

Where it sits: `main.run_command` (every mode of the command line, and the
former `evaluate` and `compare` entry points that run it) calls `configure()`
after the flags are parsed and before any stage runs. The project logs one
line per stage (and a progress bar, which is not logging); the libraries under
it (orbax checkpointing above all, also JAX and nibabel) log hundreds of INFO
lines per run, shown only on request.

absl's own `--verbosity` flag (short `-v`) chooses:
  -1   warnings and errors only;
   0   (default) the project's INFO lines, the libraries' warnings and errors;
   1   everything: the libraries' INFO lines too, and DEBUG lines.
"""

import logging as py_logging
import os

from absl import flags
from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Orbax warns on every read-only CheckpointManager, which is how trained weights are
# restored on purpose (checkpoint.restore_trained); at the default verbosity that says
# nothing a user can act on.
_EXPECTED_WARNINGS = ("Given directory is read only",)


class LibraryInfoFilter(py_logging.Filter):
  """Lets through the project's records and other code's warnings and errors.

  absl routes every record, its own and Python logging's, through one handler on
  the root logger; the emitting file (`record.pathname`) tells whose it is.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE_DIR):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    return not (record.levelno < py_logging.ERROR and "orbax" in record.pathname
                and record.getMessage().startswith(_EXPECTED_WARNINGS))


def verbosity() -> int:
  """The --verbosity the user gave, else 0 (also 0 when the flags are not parsed)."""
  flag = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
  if flag is None or not flags.FLAGS.is_parsed() or not flag.present:
    return 0
  return int(flag.value)


def _handlers() -> list[py_logging.Handler]:
  """Every handler now attached: the root's (absl's) and libraries' own (nibabel's)."""
  loggers = [py_logging.getLogger()] + [
      lg for lg in py_logging.root.manager.loggerDict.values()
      if isinstance(lg, py_logging.Logger)]
  return [h for lg in loggers for h in lg.handlers]


def configure(level: int | None = None) -> None:
  """Sets the log level and, below verbosity 1, hides other code's INFO/DEBUG lines.

  Args:
    level: absl verbosity (-1 warning, 0 info, 1 debug); default `verbosity()`.
  """
  level = verbosity() if level is None else int(level)
  logging.set_verbosity(level)
  # The handler may not exist yet outside app.run; creating it here makes the
  # filter apply to every record that reaches the root logger.
  if logging.get_absl_handler() not in py_logging.root.handlers:
    logging.use_absl_handler()
  for handler in _handlers():
    for f in [f for f in handler.filters if isinstance(f, LibraryInfoFilter)]:
      handler.removeFilter(f)
    if level < 1:
      handler.addFilter(LibraryInfoFilter())
