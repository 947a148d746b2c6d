"""Test setup, before JAX is imported anywhere.

* 8 forced CPU devices, for the multi-device tests.
* One persistent XLA compilation cache for the whole run, in a temporary folder removed at
  exit. The tests build the same tiny models many times, in this process and in the
  subprocesses they start (which inherit the variables); an identical program is then
  compiled once. A cache entry is only the compiled form of the same program, so results
  are unchanged; if XLA rejects an entry it compiles again. Set JAX_COMPILATION_CACHE_DIR
  yourself to keep or disable (empty string) it.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="slicevae_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  # Cache what took over 0.1 s to compile (the default, 1 s, would skip most tiny models).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
