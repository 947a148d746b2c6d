"""Two JAX processes on localhost CPU train like one process with the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import identifiable_params, make_cache, tiny_config
from slicevae_jax import parallel
from slicevae_jax.metric_writer import read_metrics
from slicevae_jax.slicevae import train

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


def test_launch_local_two_processes_end_to_end_with_resume(tmp_path):
  """launch/local.sh as documented: the demo smoke config over 2 processes x 2 devices."""
  workdir = str(tmp_path / "run")
  env = dict(os.environ, PYTHON=sys.executable, DEVICES_PER_PROC="2", PORT=str(_free_port()),
             PYTHONPATH=os.path.dirname(HERE))
  env.pop("XLA_FLAGS", None)
  script = os.path.join(os.path.dirname(HERE), "launch", "local.sh")

  def launch(*extra):
    r = subprocess.run(["bash", script, "2", "configs/demo.py:smoke", workdir, *extra],
                       cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                       timeout=420)
    logs = "".join(open(os.path.join(workdir, f"launch_{i}.log")).read()[-2000:]
                   for i in range(2))
    assert r.returncode == 0, r.stderr + logs

  launch("--mode=train", "--config.train.num_steps=2")       # stops after step 2
  launch()                                                    # resumes to 4, then the rest
  log1 = open(os.path.join(workdir, "launch_1.log")).read()
  assert "resumed from checkpoint at step 2" in log1
  steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert steps == [2, 4]                    # one writer: process 0
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "sample_0000.nii.gz", "sample_0000.png", "sample_0001.nii.gz", "sample_0001.png",
      "samples.json"]
