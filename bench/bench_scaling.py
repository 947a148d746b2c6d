r"""Data-parallel scaling of the slice VAE step over 1, 2, 4, 8 devices, plus 256³ arithmetic.

Each device count runs in its own process with that many forced host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) and the same per-device
batch, so the global batch grows with N (weak scaling, as on a pod). Rounds
alternate over device counts (1, 2, 4, 8, 1, 2, ...) so machine noise spreads
evenly; the median per count is reported with its ratio to 1 device.

Also prints, from XLA's cost analysis of the compiled 256³ step, the FLOPs per
slice and the memory one device needs for a per-device batch (default 128).

  python bench/bench_scaling.py                  # 64², per-device batch 8, 3 rounds
  python bench/bench_scaling.py --res 128 --per-device 4 --rounds 5

On a CPU the "devices" share the same cores: the ratio measures the overhead
of sharding and collectives, not a speed-up. Not part of the test suite.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys, time
import jax, numpy as np
sys.path.insert(0, {root!r})
from slicevae_jax import config_lib, parallel
from slicevae_jax.models import slice_vae
from slicevae_jax.slicevae import train
res, per_dev, steps = {res}, {per_dev}, {steps}
mesh = parallel.make_mesh()
n = mesh.devices.size
config = config_lib.load_module({root!r} + f"/configs/hcp{{res}}.py").get_config()
model = slice_vae.from_config(config)
tx = train.make_optimizer(config)
state = train.create_state(model, tx, mesh, jax.random.key(0))
step = train.make_train_step(model, tx, 0.2, mesh)
b = per_dev * n
x = parallel.global_batch(np.random.rand(b, res, res, 1).astype(np.float32), mesh, b)
key = jax.random.key(1)
state, m = step(state, x, key); jax.block_until_ready(m)
t = time.perf_counter()
for _ in range(steps):
  state, m = step(state, x, key)
jax.block_until_ready(m)
dt = (time.perf_counter() - t) / steps
print(json.dumps(dict(devices=n, global_batch=b, step_s=dt, slices_per_s=b / dt)))
"""

COST = r"""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, {root!r})
from slicevae_jax import config_lib, parallel
from slicevae_jax.models import slice_vae
from slicevae_jax.slicevae import train
res, batch = {res}, {batch}
mesh = parallel.make_mesh(1)
config = config_lib.load_module({root!r} + f"/configs/hcp{{res}}.py").get_config()
model = slice_vae.from_config(config)
tx = train.make_optimizer(config)
abstract = train.abstract_state(model, tx, mesh)
x = jax.ShapeDtypeStruct((batch, res, res, 1), jnp.float32, sharding=parallel.sharded(mesh))
step = train.make_train_step(model, tx, 0.2, mesh)
compiled = step.lower(abstract, x, jax.random.key(0)).compile()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
mem = compiled.memory_analysis()
out = dict(res=res, batch=batch, flops_per_slice=float(cost.get("flops", 0.0)) / batch)
if mem is not None:
  out.update(temp_gib=mem.temp_size_in_bytes / 2**30,
             args_gib=mem.argument_size_in_bytes / 2**30,
             out_gib=mem.output_size_in_bytes / 2**30)
print(json.dumps(out))
"""


def _run(code: str, devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--res", type=int, default=64)
  p.add_argument("--per-device", type=int, default=8)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4, 8])
  p.add_argument("--cost-res", type=int, default=256)
  p.add_argument("--cost-batch", type=int, default=128)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  a = p.parse_args()
  code = WORKER.format(root=ROOT, res=a.res, per_dev=a.per_device, steps=a.steps)
  runs: dict[int, list[dict]] = {n: [] for n in a.devices}
  for _ in range(a.rounds):
    for n in a.devices:
      r = _run(code, n)
      runs[n].append(r)
      print(r, flush=True)
  med = {n: statistics.median(x["slices_per_s"] for x in rs) for n, rs in runs.items()}
  cost = _run(COST.format(root=ROOT, res=a.cost_res, batch=a.cost_batch), 1)
  print(cost)
  lines = [
      f"\n## Data-parallel scaling, {datetime.date.today()} — forced host devices on "
      f"{os.cpu_count()} CPU cores",
      "",
      f"Command: `python bench/bench_scaling.py {' '.join(sys.argv[1:])}`".rstrip(),
      "",
      f"{a.res}², per-device batch {a.per_device}, median of {a.rounds} alternating rounds "
      f"of {a.steps} steps.",
      "",
      "| devices | global batch | slices/s (median) | ratio to 1 device |",
      "|---|---|---|---|",
  ]
  for n in a.devices:
    lines.append(f"| {n} | {a.per_device * n} | {med[n]:.1f} | {med[n] / med[a.devices[0]]:.2f} |")
  lines += [
      "",
      f"XLA cost analysis of one {cost['res']}³ training step (batch {cost['batch']} on one "
      f"device): {cost['flops_per_slice'] / 1e9:.2f} GFLOP per slice"
      + (f"; memory: {cost['temp_gib']:.2f} GiB temporaries + {cost['args_gib']:.3f} GiB "
         f"arguments (state + batch) + {cost['out_gib']:.3f} GiB outputs"
         if "temp_gib" in cost else "") + ".",
  ]
  with open(a.out, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
