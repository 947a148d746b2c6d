"""One process of a multi-process CPU training run (started by test_multiprocess.py).

usage: python tests/mp_worker.py PORT NUM_PROCESSES PROCESS_ID CACHE WORKDIR OUT.npz
Each process has 2 CPU devices; all processes form one mesh and train the
tiny config; process 0 saves the final parameters to OUT.npz.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main():
  port, nproc, pid, cache_dir, workdir, out = sys.argv[1:7]
  from helpers import tiny_config  # pylint: disable=import-outside-toplevel
  from slicevae_jax import parallel  # pylint: disable=import-outside-toplevel
  from slicevae_jax.data.cache import VolumeCache  # pylint: disable=import-outside-toplevel
  from slicevae_jax.slicevae import train  # pylint: disable=import-outside-toplevel
  config = tiny_config(num_steps=3, checkpoint_every=2)
  config.dist.initialize = True
  config.dist.coordinator_address = f"127.0.0.1:{port}"
  config.dist.num_processes = int(nproc)
  config.dist.process_id = int(pid)
  parallel.initialize_distributed(config.dist)
  assert jax.process_count() == int(nproc) and jax.device_count() == 2 * int(nproc)
  state = train.train(config, workdir, VolumeCache(cache_dir))
  params = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  if jax.process_index() == 0:
    np.savez(out, **params)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
