r"""Slice VAE benchmark at the paper's 64³ / 128³ / 256³ settings.

Measures, per resolution: training slices/s (jitted step on the mesh),
input-pipeline slices/s (shuffled slice gathers from a memory-mapped cache,
which must outrun training), latent-fit seconds (encode N volumes + batched
SVD), sampling seconds per volume (latent draw + vmapped decode), and peak
memory. Appends a section to bench/RESULTS.md.

  python bench/bench_slicevae.py                       # all resolutions
  python bench/bench_slicevae.py --res 64 --batch 32 --steps 5

On a CPU, use small batches and few steps; figures that matter are from a GPU.
Not part of the test suite.
"""

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from slicevae_jax import config_lib, parallel  # noqa: E402
from slicevae_jax.data import slices as slices_lib  # noqa: E402
from slicevae_jax.data.cache import CacheWriter  # noqa: E402
from slicevae_jax.models import conv, slice_vae  # noqa: E402
from slicevae_jax.slicevae import inference, train  # noqa: E402
from slicevae_jax.slicevae import latent as lg  # noqa: E402


def _time(fn, repeats):
  fn()  # compile / warm up
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeats


def peak_memory_gib() -> tuple[str, float]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device peak", stats["peak_bytes_in_use"] / 2 ** 30
  return "host max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def bench_resolution(res: int, batch: int, steps: int, n_latent: int, n_sample: int,
                     cache_volumes: int, dtype: str = "float32", conv_impl: str = "auto") -> dict:
  config = config_lib.load_module(os.path.join(ROOT, "configs", f"hcp{res}.py")).get_config()
  config.train.batch_size = batch
  config.model.dtype = dtype
  config.model.conv_impl = conv_impl
  mesh = parallel.make_mesh()
  model = slice_vae.from_config(config)
  tx = train.make_optimizer(config)
  state = train.create_state(model, tx, mesh, jax.random.key(0))
  step_fn = train.make_train_step(model, tx, 0.2, mesh)
  x = parallel.global_batch(np.random.rand(batch, res, res, 1).astype(np.float32), mesh, batch)
  key = jax.random.key(1)
  holder = {"s": state}

  def one_step():
    holder["s"], m = step_fn(holder["s"], x, key)
    return m["loss"]

  t0 = time.perf_counter()
  jax.block_until_ready(one_step())
  compile_s = time.perf_counter() - t0
  step_s = _time(one_step, steps)
  out = {"res": res, "batch": batch, "train_slices_per_s": batch / step_s,
         "train_step_s": step_s, "compile_s": compile_s,
         # The paper's HCP set: 960 training volumes of `res` slices each.
         "epoch_s_960": 960 * res * step_s / batch}

  # Input pipeline: shuffled gathers from an on-disk uint8/float cache.
  with tempfile.TemporaryDirectory() as d:
    entries = [{"id": f"v{i}", "split": "train"} for i in range(cache_volumes)]
    w = CacheWriter(os.path.join(d, "c"), entries, (res,) * 3, 1, config.data.cache_dtype, False)
    for i in range(cache_volumes):
      w.write(i, np.random.rand(res, res, res).astype(np.float32), np.eye(4))
    cache = w.finalize()
    sampler = slices_lib.SliceSampler(cache, cache.split("train"), batch, 0)
    rows = parallel.process_rows(mesh, batch)
    n_batches = max(4, steps)
    t = time.perf_counter()
    load = lambda step: slices_lib.load_batch(cache, sampler, step, rows)
    for _ in slices_lib.prefetch(load, 0, n_batches, depth=2):
      pass
    out["input_slices_per_s"] = n_batches * batch / (time.perf_counter() - t)
    del cache

  # Latent fit: encode n_latent volumes, then the batched SVD.
  variables = holder["s"].variables
  bundle = inference.InferenceBundle(config=config, model=model, variables=variables, step=0,
                                     gaussian=None, meta={"slice_axis": 1}, mesh=mesh)
  stacks = np.random.rand(min(n_latent, 4), res, res, res).astype(np.float32)
  inference.encode_stacks(bundle, stacks, batch=config.latent.encode_batch)  # compile
  t = time.perf_counter()
  inference.encode_stacks(bundle, stacks, batch=config.latent.encode_batch)
  encode_per_vol = (time.perf_counter() - t) / len(stacks)
  y = jnp.asarray(np.random.randn(n_latent, res, 1024).astype(np.float32))
  fit = jax.jit(lambda y: lg.fit(y, config.latent.rank).W)
  svd_s = _time(lambda: fit(y), 1)
  out["latent_encode_s_per_volume"] = encode_per_vol
  out["latent_svd_s"] = svd_s
  out["latent_fit_s_estimate_N400"] = 400 * encode_per_vol + svd_s * 400 / n_latent

  # Sampling: latent draw + vmapped decode, per volume.
  bundle.gaussian = lg.fit(y, config.latent.rank)
  # Warm up with the timed call's shapes: a different batch would compile again.
  inference.sample_volumes(bundle, jax.random.key(0), n_sample, batch=min(n_sample, 4))
  t = time.perf_counter()
  inference.sample_volumes(bundle, jax.random.key(1), n_sample, batch=min(n_sample, 4))
  out["sample_s_per_volume"] = (time.perf_counter() - t) / n_sample
  out["memory_kind"], out["peak_memory_gib"] = peak_memory_gib()
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--res", type=int, nargs="*", default=[64, 128, 256])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--latent-volumes", type=int, default=400, help="N for the SVD timing")
  p.add_argument("--sample-volumes", type=int, default=4)
  p.add_argument("--cache-volumes", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="model.dtype: compute dtype of activations and convolutions")
  p.add_argument("--conv-impl", default="auto", choices=list(config_lib.CONV_IMPLS),
                 help="model.conv_impl (models/conv.py): 'auto' is 'small' on a CPU, 'xla' "
                 "elsewhere")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  a = p.parse_args()
  rows = []
  for res in a.res:
    r = bench_resolution(res, a.batch, a.steps, a.latent_volumes, a.sample_volumes,
                         a.cache_volumes, a.dtype, a.conv_impl)
    print(r, flush=True)
    rows.append(r)
  dev = jax.devices()[0]
  lines = [
      f"\n## Slice VAE, {datetime.date.today()} — {jax.device_count()}x {dev.device_kind} "
      f"({dev.platform}), {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPUs, JAX {jax.__version__}, {a.dtype}, conv_impl "
      f"{a.conv_impl} ({conv.resolve(a.conv_impl)})",
      "",
      f"Command: `python bench/bench_slicevae.py {' '.join(sys.argv[1:])}`".rstrip(),
      "",
      "| res | batch | train slices/s | epoch s (960 vols) | input slices/s | compile s | "
      f"encode s/vol | SVD s (N={a.latent_volumes}) | est. fit s (N=400) | sample s/vol | "
      "peak mem GiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['res']}³ | {r['batch']} | {r['train_slices_per_s']:.1f} | "
        f"{r['epoch_s_960']:.0f} | {r['input_slices_per_s']:.0f} | {r['compile_s']:.1f} | "
        f"{r['latent_encode_s_per_volume']:.2f} | {r['latent_svd_s']:.2f} | "
        f"{r['latent_fit_s_estimate_N400']:.0f} | {r['sample_s_per_volume']:.3f} | "
        f"{r['peak_memory_gib']:.2f} ({r['memory_kind']}) |")
  with open(a.out, "a", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
