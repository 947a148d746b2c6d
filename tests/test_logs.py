"""Log filtering: the project's lines stay, libraries' INFO lines only at --verbosity=1."""

import logging as py_logging

from absl import logging

from slicevae_jax import logs


def _record(path: str, level: int, msg: str = "m") -> py_logging.LogRecord:
  return py_logging.LogRecord("absl", level, path, 1, msg, None, None)


def test_filter_keeps_project_lines_and_library_warnings():
  f = logs.LibraryInfoFilter()
  project = logs._PACKAGE_DIR + "trainer.py"  # pylint: disable=protected-access
  orbax = "/x/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert f.filter(_record(project, py_logging.INFO))
  assert f.filter(_record(project, py_logging.DEBUG))
  assert not f.filter(_record(orbax, py_logging.INFO))
  assert not f.filter(_record("/x/site-packages/jax/_src/xla_bridge.py", py_logging.INFO))
  assert f.filter(_record(orbax, py_logging.WARNING, "disk full"))
  assert f.filter(_record(orbax, py_logging.ERROR))
  # Orbax's warning on every read-only restore is expected, not news.
  assert not f.filter(_record(orbax, py_logging.WARNING, "Given directory is read only=/w"))


def test_configure_installs_the_filter_below_verbosity_one():
  def installed():
    return any(isinstance(f, logs.LibraryInfoFilter)
               for f in logging.get_absl_handler().filters)
  before = logging.get_verbosity()
  try:
    logs.configure(0)
    assert installed() and logging.get_verbosity() == logging.INFO
    logs.configure(0)   # idempotent: one filter, not two
    assert sum(isinstance(f, logs.LibraryInfoFilter)
               for f in logging.get_absl_handler().filters) == 1
    logs.configure(1)
    assert not installed() and logging.get_verbosity() == logging.DEBUG
  finally:   # leave the process as it was for the tests after this one
    logs.configure(1)
    logging.set_verbosity(before)
