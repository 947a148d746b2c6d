r"""3D baselines (WGAN-GP, VAE-GAN, α-GAN, α-WGAN, 3D VAE): step cost, memory and speed.

For each resolution and model, the training iteration (`Baseline.step`, jitted
by `trainer.jit_train_step` with its shardings and donation, on a
1-device mesh) is lowered and compiled against abstract inputs, so nothing
runs and nothing is allocated; from the compiled program it reports:

  - compile seconds (lower + compile);
  - XLA's cost analysis: GFLOP per iteration and per volume;
  - XLA's memory analysis: temporaries + arguments (+ outputs not aliased to
    the donated state) = what one device needs for the step;
  - parameter count, per network and in all.

Unless --cost-only, it then runs the step on random volumes: one warm-up
iteration per model, then --rounds rounds of --steps timed iterations, the
models alternating within a round and the order reversed every other round
(A B C, C B A, ...) so machine noise spreads evenly; it reports the median
over rounds (iterations/s, volumes/s, achieved GFLOP/s) and the process's
peak memory so far (device peak on a GPU, host max RSS on a CPU; cumulative,
so only a rise is the model's own: run one model per process for its peak).

  python bench/bench_baselines.py --res 64 --batch 4 --max-channels 32 --steps 1 --rounds 2
  python bench/bench_baselines.py --res 64 128 256 --cost-only --append
  python bench/bench_baselines.py --models alpha_wgan --res 128 --steps 5 --rounds 3 --append

--append adds a section to bench/RESULTS.md. One "step" is one iteration of the
model's reference schedule (WGAN-GP: 1 critic + 5 generator updates; the
others one update per network). XLA's cost analysis counts a while-loop body
once whatever its trip count, so for schedules with repeated updates the FLOP
column adds the missing trips, measured by lowering the same schedule with
one and two updates of each kind. Not part of the test suite.
"""

import argparse
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from slicevae_jax import config_lib, parallel, trainer  # noqa: E402
from slicevae_jax.baselines import stages, steps  # noqa: E402

GIB = 2 ** 30


@dataclasses.dataclass
class Row:
  """Everything measured for one (resolution, model)."""
  res: int
  model: str
  batch: int
  params: dict[str, int]
  compile_s: float
  gflop_step: float
  temp_gib: float
  args_gib: float
  need_gib: float
  step_s: list[float] = dataclasses.field(default_factory=list)
  peak_gib: float | None = None

  @property
  def median_step_s(self) -> float:
    return statistics.median(self.step_s)


def model_config(res: int, model: str, a: argparse.Namespace):
  hcp = config_lib.load_module(os.path.join(ROOT, "configs", f"hcp{res}.py")).get_config()
  config = stages.as_baseline(hcp, model)
  config.train.batch_size = a.batch
  b = config.baseline
  if a.max_channels is not None:
    b.max_channels = a.max_channels
  if a.latent_dim is not None:
    b.latent_dim = a.latent_dim
  if a.vae3d_channels is not None:
    b.vae3d_channels = a.vae3d_channels
  if a.dtype is not None:
    b.dtype = a.dtype
  for item in a.set:
    key, value = item.split("=", 1)
    group, name = key.split(".", 1) if "." in key else ("baseline", key)
    old = config[group][name]
    config[group][name] = type(old)(value) if not isinstance(old, bool) else value == "True"
  return config


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def _abstract_inputs(model, mesh, batch: int):
  g = model.grid
  x = jax.ShapeDtypeStruct((batch, g, g, g, 1), jnp.float32, sharding=parallel.sharded(mesh))
  return trainer.abstract_state(model.init, mesh), x, jax.random.key(0)


def _lowered_flops(config, mesh, batch: int, n_critic: int, n_gen: int) -> float:
  c = config.copy_and_resolve_references()
  c.baseline.n_critic, c.baseline.n_gen = n_critic, n_gen
  model = stages.build(c)
  step = trainer.jit_train_step(model.step, mesh)
  return _flops(step.lower(*_abstract_inputs(model, mesh, batch)).cost_analysis())


def schedule_flops(config, mesh, batch: int, compiled_flops: float,
                   lowered_flops: float) -> float:
  """FLOPs of one iteration with every repeated update counted (see the module docstring).

  The lowered (unoptimised) program counts each loop body once; L(1, 1), L(2, 1)
  and L(1, 2) give one critic and one generator-side update exactly, and the
  difference from the real program's lowered count is added to its compiled count.
  """
  n_critic, n_gen = stages.updates_per_iteration(config)
  if n_critic == 1 and n_gen == 1:
    return compiled_flops
  base = _lowered_flops(config, mesh, batch, 1, 1)
  full = base
  if n_critic > 1:
    full += (n_critic - 1) * (_lowered_flops(config, mesh, batch, 2, 1) - base)
  if n_gen > 1:
    full += (n_gen - 1) * (_lowered_flops(config, mesh, batch, 1, 2) - base)
  return compiled_flops + full - lowered_flops


def build(res: int, model_name: str, a: argparse.Namespace, mesh):
  """(Row with the compile-time figures, compiled step, model)."""
  config = model_config(res, model_name, a)
  model = stages.build(config)
  step = trainer.jit_train_step(model.step, mesh)
  abstract = _abstract_inputs(model, mesh, a.batch)
  t = time.perf_counter()
  lowered = step.lower(*abstract)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  flops = schedule_flops(config, mesh, a.batch, _flops(compiled.cost_analysis()),
                         _flops(lowered.cost_analysis()))
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes / GIB
  args = mem.argument_size_in_bytes / GIB
  need = temp + args + (mem.output_size_in_bytes - mem.alias_size_in_bytes) / GIB
  params = {name: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(p))
            for name, p in abstract[0].params.items()}
  row = Row(res=res, model=model_name, batch=a.batch, params=params, compile_s=compile_s,
            gflop_step=flops / 1e9, temp_gib=temp, args_gib=args, need_gib=need)
  return row, compiled, model


def peak_memory_gib() -> tuple[str, float]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device peak", stats["peak_bytes_in_use"] / GIB
  return "host max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def bench_resolution(res: int, a: argparse.Namespace, mesh) -> list[Row]:
  rows: dict[str, Row] = {}
  live: dict[str, list] = {}  # model -> [compiled step, state]
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.uniform(-1, 1, (a.batch, res, res, res, 1)).astype(np.float32),
                     parallel.sharded(mesh)) if not a.cost_only else None
  key = jax.random.key(1)
  for r in range(1 if a.cost_only else a.rounds):
    order = a.models if r % 2 == 0 else a.models[::-1]
    for name in order:
      if name not in rows:
        rows[name], compiled, model = build(res, name, a, mesh)
        print(f"{res}³ {name}: compiled in {rows[name].compile_s:.1f} s, "
              f"{rows[name].gflop_step:.1f} GFLOP/step, need {rows[name].need_gib:.2f} GiB",
              flush=True)
        if a.cost_only:
          continue
        state = jax.jit(model.init, out_shardings=parallel.replicated(mesh))(jax.random.key(0))
        for _ in range(a.warmup):
          state, m = compiled(state, x, key)
        jax.block_until_ready((state, m))
        live[name] = [compiled, state]
      compiled, state = live[name]
      t = time.perf_counter()
      for _ in range(a.steps):
        state, m = compiled(state, x, key)
      jax.block_until_ready((state, m))
      dt = (time.perf_counter() - t) / a.steps
      live[name][1] = state
      rows[name].step_s.append(dt)
      if r == 0:
        a.memory_kind, rows[name].peak_gib = peak_memory_gib()
      print(f"{res}³ {name} round {r}: {dt:.2f} s/step", flush=True)
  live.clear()
  return [rows[n] for n in a.models]


def _params(p: dict[str, int]) -> str:
  return " / ".join(f"{n} {v / 1e6:.3g}" for n, v in sorted(p.items()))


def table(rows: list[Row], timed: bool, memory_kind: str) -> list[str]:
  head = ("| res | model | params (M): per net / total | compile s | GFLOP / step | "
          "GFLOP / volume | temp GiB | args GiB | need GiB |")
  sep = "|---|---|---|---|---|---|---|---|---|"
  if timed:
    head += f" steps/s | volumes/s | achieved GFLOP/s | {memory_kind} so far GiB |"
    sep += "---|---|---|---|"
  lines = [head, sep]
  for r in rows:
    line = (f"| {r.res}³ | {r.model} | {_params(r.params)} / {sum(r.params.values()) / 1e6:.3g} | "
            f"{r.compile_s:.1f} | {r.gflop_step:.1f} | {r.gflop_step / r.batch:.1f} | "
            f"{r.temp_gib:.2f} | {r.args_gib:.2f} | {r.need_gib:.2f} |")
    if timed:
      s = r.median_step_s
      line += (f" {1 / s:.3f} | {r.batch / s:.3f} | {r.gflop_step / s:.1f} | "
               f"{r.peak_gib:.2f} |")
    lines.append(line)
  return lines


def reading(rows: list[Row], timed: bool, cpu: bool, platform_name: str) -> str:
  """A one-paragraph reading of the numbers, generated from them."""
  out = []
  if timed:
    rates = [r.gflop_step / r.median_step_s for r in rows]
    where = "XLA's CPU backend" if cpu else f"this {platform_name}"
    out.append(f"{where} sustains {min(rates):.3g}–{max(rates):.3g} GFLOP/s on these 3D "
               "convolution steps (cost-analysis FLOPs ÷ median step time)")
    if cpu:
      out[-1] += (", far below an accelerator, so the CPU step times say what a test run "
                  "costs here, not how fast the baselines train")
    out[-1] += "."
  heavy = max(rows, key=lambda r: r.gflop_step / r.batch)
  light = min(rows, key=lambda r: r.gflop_step / r.batch)
  big = max(rows, key=lambda r: r.need_gib)
  out.append(
      f"The GFLOP and memory columns come from XLA's analysis of the compiled step "
      f"(compiled for {platform_name}; a GPU compile fuses differently, so read memory as "
      f"±tens of percent) and say what a GPU needs: per volume, the heaviest iteration is "
      f"{heavy.model} at {heavy.res}³ ({heavy.gflop_step / heavy.batch:.0f} GFLOP) and the "
      f"lightest {light.model} at {light.res}³ ({light.gflop_step / light.batch:.0f} GFLOP); "
      f"the largest per-device need is {big.need_gib:.1f} GiB ({big.model} at {big.res}³, "
      f"batch {big.batch}), which "
      + ("fits" if big.need_gib < 75 else "does not fit")
      + " one 80 GiB accelerator.")
  if any(r.model == "wgan_gp" for r in rows):
    out.append("WGAN-GP's FLOPs include all its generator updates (XLA counts a loop body "
               "once; corrected as the script's docstring says).")
  out.append("Memory is one device's: the batch divides over devices, the state (parameters "
             "and Adam moments, in 'args') does not.")
  return " ".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", nargs="*", default=list(steps.MODELS), choices=steps.MODELS)
  p.add_argument("--res", type=int, nargs="*", default=[64])
  p.add_argument("--batch", type=int, default=4, help="volumes per step (the reference's 4)")
  p.add_argument("--steps", type=int, default=2, help="timed iterations per round")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--warmup", type=int, default=1, help="untimed iterations per model")
  p.add_argument("--max-channels", type=int, default=None, help="baseline.max_channels (512)")
  p.add_argument("--latent-dim", type=int, default=None, help="baseline.latent_dim (1000)")
  p.add_argument("--vae3d-channels", type=int, default=None, help="baseline.vae3d_channels (16)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  p.add_argument("--set", action="append", default=[], metavar="[GROUP.]KEY=VALUE",
                 help="any other config value (group defaults to baseline), repeatable")
  p.add_argument("--cost-only", action="store_true", help="compile and analyse; run nothing")
  p.add_argument("--append", action="store_true", help="append a section to --out")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  a = p.parse_args()
  a.memory_kind = "peak"
  mesh = parallel.make_mesh(1)
  rows = []
  for res in a.res:
    rows += bench_resolution(res, a, mesh)
  dev = jax.devices()[0]
  timed = not a.cost_only
  c = model_config(a.res[0], a.models[0], a).baseline
  settings = (f"Batch {a.batch} volumes on one device; baseline.max_channels {c.max_channels}, "
              f"latent_dim {c.latent_dim}, code_hidden {c.code_hidden}, encoder_hidden "
              f"{c.encoder_hidden}, vae3d_channels {c.vae3d_channels}, dtype {c.dtype}. ")
  if timed:
    settings += (f"Median of {a.rounds} alternating rounds (order reversed every other round) "
                 f"of {a.steps} timed iteration(s) after {a.warmup} warm-up iteration(s).")
  else:
    settings += "Compiled and analysed only (--cost-only): nothing ran."
  lines = [
      f"\n## 3D baselines, {datetime.date.today()} — {jax.device_count()}x {dev.device_kind} "
      f"({dev.platform}), {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPUs, JAX {jax.__version__}",
      "",
      f"Command: `python bench/bench_baselines.py {' '.join(sys.argv[1:])}`".rstrip(),
      "",
      settings,
      "",
  ] + table(rows, timed, a.memory_kind)
  if timed:
    per_round = "; ".join(f"{r.res}³ {r.model} " + ", ".join(f"{s:.1f}" for s in r.step_s)
                          for r in rows)
    lines += ["", f"(Per-round seconds per iteration: {per_round}.)"]
  lines += ["", reading(rows, timed, dev.platform == "cpu", dev.device_kind)]
  print("\n".join(lines))
  if a.append:
    with open(a.out, "a", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
