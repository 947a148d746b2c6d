"""Two JAX processes on localhost CPU train like one process with the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import identifiable_params, make_cache, tiny_config
from slicevae_jax import parallel, train

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  cache = make_cache(str(tmp_path / "cache"))
  port = _free_port()
  out = str(tmp_path / "params.npz")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "mp_worker.py"), str(port), "2", str(i), cache.path,
       str(tmp_path / "mp"), out], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=420)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process run timed out")
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  # The same global batch (16) on 4 devices of one process.
  single = train.train(tiny_config(num_steps=3, checkpoint_every=2), str(tmp_path / "sp"),
                       cache, mesh=parallel.make_mesh(4))
  got = np.load(out)
  ref = identifiable_params(single.params)
  assert set(ref) <= set(got.files)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=2e-5, err_msg=k)
  # Both processes saw the checkpoints of the shared run.
  assert sorted(os.listdir(tmp_path / "mp" / "checkpoints"))[:2] == ["2", "3"]
