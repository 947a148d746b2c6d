r"""Evaluation benchmark: affine registration, RAS and MS-SSIM cost per resolution.

Measures, per grid size: seconds per registered pair (one pair alone, and per pair when
`--pair-batch` pairs run in one vmapped call), seconds per RAS volume (one generated volume
registered to M real volumes, warped and scored: what each generated sample costs), and
3D MS-SSIM seconds per pair (both modes, batched). Registration settings are the paper-scale
defaults of config.eval (3 levels, 150/100/50 Adam steps) unless overridden. Compile time is
excluded (one warm-up call per shape) and reported apart. Appends a section to
bench/RESULTS.md (--results).

  python bench/bench_eval.py                          # 64³ and 128³
  python bench/bench_eval.py --res 64 128 256 --num-real 4
  python bench/bench_eval.py --res 64 --iters 50 30 20
  python bench/bench_eval.py --res 256 --parts single --cost    # one 256³ pair + XLA costs
  python bench/bench_eval.py --res 64 128 --compare-ref main    # paired, vs a git ref

--parts picks what runs (single, batched, ras, msssim). --cost compiles the registration of
`--pair-batch` pairs without running it and reports XLA's cost analysis (FLOPs and bytes
accessed: the setup, then one Adam step of each level, from compiles with 0 and 1 steps, so
the loop trip counts do not matter) and memory analysis (temporaries with the pairs vmapped
in lockstep, as on a GPU, and one at a time, as on CPU): inputs for a GPU estimate.
--compare-ref runs bench/reg_compare.py (paired, alternating subprocesses of REF and this
tree on embedded brains: speed ratios and old-vs-new accuracy) instead of the rest.

Volumes are smooth synthetic ellipsoid 'brains' with two labels; registration cost does not
depend on the content. Not part of the test suite.
"""

import argparse
import datetime
import math
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slicevae_jax import config_lib  # noqa: E402
from slicevae_jax.eval import evaluate  # noqa: E402
from slicevae_jax.metrics import ms_ssim, ras, registration  # noqa: E402


def _volume(grid: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """An ellipsoid with an inner 'ventricle' [grid]³ in [0, 1] and its labels (0, 1, 2)."""
  c = (np.arange(grid) - grid / 2 + 0.5) / (grid / 2)
  x, y, z = np.meshgrid(c, c, c, indexing="ij")
  a = rng.uniform(0.6, 0.85, 3)
  outer = (x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2
  inner = (x / (0.3 * a[0])) ** 2 + (y / (0.4 * a[1])) ** 2 + (z / (0.3 * a[2])) ** 2
  v = np.where(outer < 1, 0.7 + 0.2 * np.cos(4 * x), 0.0)
  v = np.where(inner < 1, 0.2, v).astype(np.float32)
  labels = np.where(inner < 1, 1, np.where(outer < 1, 2, 0)).astype(np.uint8)
  return v, labels


PARTS = ("single", "batched", "ras", "msssim")


def _timed(fn):
  t = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t, out


def _xla_cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of a compiled function, as XLA's cost analysis counts them."""
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def registration_cost(res: int, reg_kwargs: dict, pairs: int) -> dict:
  """Compile-only costs of registering `pairs` pairs at res³ (module docstring, --cost).

  XLA's cost analysis counts a loop body once, so a step's cost comes from compiling one
  level's step (`registration.level_grad`, vmapped over the pairs) on its own, and the setup
  (pyramid, blocks, centres of mass) is the whole registration with one step per level less
  those steps.
  """
  shape = jax.ShapeDtypeStruct((pairs, res, res, res), np.float32)
  init = jax.ShapeDtypeStruct((pairs, registration.NUM_PARAMS), np.float32)
  levels, iters = reg_kwargs["levels"], tuple(reg_kwargs["iters"])
  sim = reg_kwargs["similarity"]
  stride = int(reg_kwargs.get("fine_stride", 1))
  kw = dict(levels=levels, lr=(float(reg_kwargs["lr"]),) * levels, similarity=sim, window=5,
            com_init=True, fine_stride=stride)

  def compiled(steps, width):
    return registration._register_batch.lower(  # pylint: disable=protected-access
        shape, shape, init, iters=steps, vmap_width=width, **kw).compile()

  t = time.perf_counter()
  full = {w: compiled(iters, w) for w in (pairs, 1)}
  out = {"pairs": pairs, "compile_s": (time.perf_counter() - t) / 2}
  for w, c in full.items():
    mem = c.memory_analysis()
    out[f"temp_gib_width{w}"] = mem.temp_size_in_bytes / 2 ** 30
    out["args_gib"] = mem.argument_size_in_bytes / 2 ** 30
  steps = []
  for level in range(levels):
    m = math.ceil(res / 2 ** (levels - 1 - level))
    n_rows = (m + 2) ** 3
    level_stride = stride if level == levels - 1 else 1
    step = jax.jit(jax.vmap(lambda p, r, f, st=level_stride: registration.level_grad(
        p, r, f, (res,) * 3, sim, 5, st)))
    steps.append(_xla_cost(step.lower(
        init, jax.ShapeDtypeStruct((pairs, n_rows, 8), np.float32),
        jax.ShapeDtypeStruct((pairs, m, m, m), np.float32)).compile()))
  one_each = _xla_cost(compiled((1,) * levels, pairs))
  setup = [one_each[i] - sum(s[i] for s in steps) for i in range(2)]
  out["setup_gflop_pair"], out["setup_gb_pair"] = setup[0] / pairs / 1e9, setup[1] / pairs / 1e9
  out["step_gflop_pair"] = [f / pairs / 1e9 for f, _ in steps]
  out["step_gb_pair"] = [b / pairs / 1e9 for _, b in steps]
  out["total_gflop_pair"] = out["setup_gflop_pair"] + sum(
      n * f for n, f in zip(iters, out["step_gflop_pair"]))
  out["total_gb_pair"] = out["setup_gb_pair"] + sum(
      n * b for n, b in zip(iters, out["step_gb_pair"]))
  return out


def bench_resolution(res: int, reg_kwargs: dict, pair_batch: int, num_real: int,
                     msssim_batch: int, parts: tuple[str, ...] = PARTS) -> dict:
  rng = np.random.default_rng(res)
  n_vol = max(pair_batch if "batched" in parts else 1, num_real if "ras" in parts else 1,
              msssim_batch if "msssim" in parts else 1) + 1
  vols, labels = zip(*(_volume(res, rng) for _ in range(n_vol)))
  vols, labels = np.stack(vols), np.stack(labels)
  out = {"res": res, "pair_batch": pair_batch, "num_real": num_real}

  if "single" in parts:
    single = lambda: registration.register_affine(vols[0], vols[1], **reg_kwargs)
    out["compile_single_s"], _ = _timed(single)
    out["single_pair_s"], _ = _timed(single)
    print(f"{res}³ single pair: {out}", file=sys.stderr, flush=True)

  if "batched" in parts:
    mov, fix = vols[1:pair_batch + 1], np.repeat(vols[:1], pair_batch, axis=0)
    batched = lambda: registration.register_affine(mov, fix, **reg_kwargs)
    out["compile_batched_s"], _ = _timed(batched)
    t, _ = _timed(batched)
    out["batched_pair_s"] = t / pair_batch

  # One generated volume against M real ones, through the public RAS function.
  if "ras" in parts:
    fixed, fixed_labels = vols[1:num_real + 1], labels[1:num_real + 1]
    ras_fn = lambda: ras.ras_from_labels(vols[:1], labels[:1], fixed, fixed_labels, 3,
                                         pair_batch=pair_batch, **reg_kwargs)["ras"]
    _timed(ras_fn)   # warm-up: label warp and Dice compile on the first call
    out["ras_volume_s"], out["ras_value"] = _timed(ras_fn)

  if "msssim" in parts:
    a, b = vols[:msssim_batch], vols[1:msssim_batch + 1]
    for name, kwon in (("msssim", False), ("msssim_kwon", True)):
      fn = lambda kwon=kwon: ms_ssim.ms_ssim(a, b, kwon=kwon)
      _timed(fn)
      t, _ = _timed(fn)
      out[f"{name}_pair_s"] = t / msssim_batch
  return out


def _fmt(r: dict, key: str, spec: str = ".3g") -> str:
  return format(r[key], spec) if key in r else "—"


def _cost_lines(costs: list[dict], reg_kwargs: dict) -> list[str]:
  lines = [
      "", f"XLA cost analysis of the registration (compiled on {jax.default_backend()}, not run): "
      f"per pair; one Adam step per level, coarsest first; total = setup + "
      f"{list(reg_kwargs['iters'])} steps. Temporaries for the pairs vmapped in lockstep "
      "(GPU default) and one at a time (CPU default).", "",
      "| res | pairs | GFLOP / step | GB accessed / step | total GFLOP | total GB "
      "| temp GiB (lockstep / one at a time) | args GiB | compile s |",
      "|---|---|---|---|---|---|---|---|---|"]
  for c in costs:
    lockstep = c[f"temp_gib_width{c['pairs']}"]
    lines.append(
        f"| {c['res']}³ | {c['pairs']} | {' / '.join(f'{x:.3g}' for x in c['step_gflop_pair'])} "
        f"| {' / '.join(f'{x:.3g}' for x in c['step_gb_pair'])} | {c['total_gflop_pair']:.4g} "
        f"| {c['total_gb_pair']:.4g} | {lockstep:.3g} / "
        f"{c['temp_gib_width1']:.3g} | {c['args_gib']:.3g} | {c['compile_s']:.1f} |")
  return lines


def main() -> None:
  e = config_lib.base_config().eval
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--res", type=int, nargs="+", default=[64, 128])
  p.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS),
                 help="what to time (none: only --cost)")
  p.add_argument("--cost", action="store_true", help="XLA cost / memory of the registration")
  p.add_argument("--pair-batch", type=int, default=int(e.pair_batch))
  p.add_argument("--num-real", type=int, default=8, help="M real volumes per RAS volume")
  p.add_argument("--msssim-batch", type=int, default=int(e.msssim_batch))
  p.add_argument("--levels", type=int, default=int(e.reg_levels))
  p.add_argument("--iters", type=int, nargs="+", default=list(e.reg_iters))
  p.add_argument("--lr", type=float, default=float(e.reg_lr))
  p.add_argument("--similarity", default=str(e.similarity))
  p.add_argument("--fine-stride", type=int, default=int(e.reg_fine_stride))
  p.add_argument("--compare-ref", metavar="REF", help="paired comparison with git REF")
  p.add_argument("--rounds", type=int, default=4, help="--compare-ref: rounds per tree")
  p.add_argument("--repeats", type=int, default=2, help="--compare-ref: timed calls per run")
  p.add_argument("--q", type=int, default=2, help="--compare-ref: self pairs (and inter)")
  p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  args = p.parse_args()
  e.reg_levels, e.reg_iters, e.reg_lr, e.similarity = (args.levels, tuple(args.iters), args.lr,
                                                       args.similarity)
  e.reg_fine_stride = args.fine_stride
  reg_kwargs = evaluate.registration_settings(e)
  if args.compare_ref:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import reg_compare  # pylint: disable=import-outside-toplevel
    for res in args.res:
      reg_compare.compare(args.compare_ref, res, args.q, args.rounds, args.repeats, reg_kwargs)
    return

  dev = jax.devices()[0]
  rows, costs = [], []
  parts = tuple(args.parts)
  for res in args.res:
    if args.cost:
      costs.append({"res": res, **registration_cost(res, reg_kwargs, args.pair_batch)})
      print(f"{res}³ cost: {costs[-1]}", file=sys.stderr, flush=True)
    r = bench_resolution(res, reg_kwargs, args.pair_batch, args.num_real, args.msssim_batch,
                         parts)
    rows.append(r)
    print(f"{res}³ done: {r}", file=sys.stderr, flush=True)

  date = datetime.date.today().isoformat()
  cmd = "python bench/bench_eval.py " + " ".join(sys.argv[1:])
  lines = [
      f"## Evaluation (registration, RAS, MS-SSIM), {date} — {len(jax.devices())}x "
      f"{dev.device_kind} ({dev.platform}), {os.cpu_count()} CPUs, JAX {jax.__version__}",
      "",
      f"Command: `{cmd.strip()}`",
      "",
      f"Registration: {reg_kwargs['levels']} levels, {list(reg_kwargs['iters'])} Adam steps, "
      f"lr {reg_kwargs['lr']}, {reg_kwargs['similarity']}, fine stride "
      f"{reg_kwargs['fine_stride']}; batched = {args.pair_batch} pairs "
      f"per call (vmap_width {registration.default_vmap_width(args.pair_batch)}); RAS volume "
      f"= 1 generated volume vs M = {args.num_real} real volumes (register + warp labels + "
      f"Dice); MS-SSIM in batches of {args.msssim_batch} pairs. "
      "Timed calls follow a warm-up call of the same shape.",
      "",
      "| res | s / pair (single) | s / pair (batched) | s / RAS volume (M real) "
      "| MS-SSIM s / pair | MS-SSIM (Kwon) s / pair "
      "| first call s, compile + run (single / batched) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['res']}³ | {_fmt(r, 'single_pair_s')} | {_fmt(r, 'batched_pair_s')} "
                 f"| {_fmt(r, 'ras_volume_s')} (M={r['num_real']}) | {_fmt(r, 'msssim_pair_s')} "
                 f"| {_fmt(r, 'msssim_kwon_pair_s')} "
                 f"| {_fmt(r, 'compile_single_s', '.1f')} / "
                 f"{_fmt(r, 'compile_batched_s', '.1f')} |")
  if costs:
    lines += _cost_lines(costs, reg_kwargs)
  section = "\n".join(lines) + "\n"
  print(section)
  with open(args.results, "a", encoding="utf-8") as f:
    f.write("\n" + section)


if __name__ == "__main__":
  main()
