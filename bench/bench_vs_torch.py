r"""JAX against a PyTorch reference on the slice VAE: training slices/s and decode s/volume.

Both frameworks run the same network (bench/torch_reference.py, checked against
slice_vae.py by `python bench/torch_reference.py --check`) in alternating subprocesses: per
round and resolution, one torch and one JAX process, their order swapped every round so that
machine noise and thermal drift fall on both alike; each process builds its model, warms up
(JAX compiles), times, and prints one JSON line. Reported: medians over rounds and the ratio
jax/torch.

  (a) training: slices/s of a full step (forward, backward, Adam update) on random slices.
      JAX: the project's `train.make_train_step` on `parallel.make_mesh()` with
      configs/hcp{res}.py (batch overridden; the step includes its non-finite guard and
      gradient norm). torch: zero_grad, forward, loss, backward, Adam step.
  (b) decode: seconds to decode one volume, S = res slices of latents [S, 2, 2, 256] ->
      [S, res, res, 1], at inference with BatchNorm's running averages. JAX: the jitted
      `slice_vae.apply_inference(..., "decode")` that sampling's `inference.decode_latents`
      applies per stack; torch: eval() + torch.inference_mode(). Each call is synchronised
      and timed alone (median of --decode-reps). Also listed, JAX only: one volume through
      `inference.decode_latents` itself (host latents in, host volume out), as sampling
      calls it.

Timing waits for the device: jax.block_until_ready, torch.cuda.synchronize on a GPU.
--device gpu runs torch on CUDA with cudnn.benchmark=True and JAX on its default backend
(which must be a GPU); float32 both, TF32 convolutions as each framework's default allows.
torch uses its default CPU threads, XLA all cores. --jax-cache DIR gives the JAX processes a
shared persistent compilation cache (rounds after the first load their executables instead
of compiling: shorter runs, same steady-state times), off by default since the project sets
none and the end-to-end `decode_latents` column would then time cache loads, not compiles.

  pip install -r bench/requirements.txt
  python bench/bench_vs_torch.py --device gpu --append     # 64/128/256 x batch 32/128, 3 rounds
  python bench/bench_vs_torch.py --res 64 --batch 32 --rounds 1 --steps 3    # CPU smoke run

--append adds a section to bench/RESULTS.md; without it the section is only printed. Not part
of the test suite (the tests never import torch).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LATENT = (2, 2, 256)


# --- workers: one framework, one resolution, every batch and the decode ----------------

def _config(res: int, batch: int):
  sys.path.insert(0, ROOT)
  from slicevae_jax import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_module(os.path.join(ROOT, "configs", f"hcp{res}.py")).get_config()
  config.train.batch_size = batch
  return config


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _guarded(fn, *args) -> dict:
  """fn(*args), or {'error': ...} when it raises (e.g. out of memory), so one failure does
  not lose the process's other measurements."""
  try:
    return fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def torch_worker(a) -> dict:
  """Times the torch reference; returns the process's JSON record."""
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, HERE)
  import torch_reference as tr  # pylint: disable=import-outside-toplevel

  gpu = a.device == "gpu"
  if gpu:
    if not torch.cuda.is_available():
      raise SystemExit("--device gpu: torch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
  dev = torch.device("cuda" if gpu else "cpu")
  sync = torch.cuda.synchronize if gpu else (lambda: None)
  torch.manual_seed(0)

  def peak_gib():
    return torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else None

  def train(batch):
    config = _config(a.res, batch)
    model = tr.from_config(config).to(dev).train()
    opt = tr.make_optimizer(model, float(config.train.learning_rate))
    x = torch.rand(batch, 1, a.res, a.res, device=dev)
    kl = float(config.train.kl_weight)
    if gpu:
      torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    tr.train_step(model, opt, x, kl)
    sync()
    first = time.perf_counter() - t
    for _ in range(a.warmup - 1):
      tr.train_step(model, opt, x, kl)
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
      loss = tr.train_step(model, opt, x, kl)
    sync()
    dt = (time.perf_counter() - t) / a.steps
    if not torch.isfinite(loss):
      raise FloatingPointError("non-finite loss")
    return {"slices_per_s": batch / dt, "step_s": dt, "first_step_s": first,
            "peak_gib": peak_gib()}

  def decode():
    model = tr.from_config(_config(a.res, 1)).to(dev).eval()
    z = torch.randn(a.res, LATENT[2], LATENT[0], LATENT[1], device=dev)
    times = []
    with torch.inference_mode():
      t = time.perf_counter()
      model.decode(z)
      sync()
      first = time.perf_counter() - t
      for _ in range(a.warmup - 1):
        model.decode(z)
      sync()
      for _ in range(a.decode_reps):
        t = time.perf_counter()
        out = model.decode(z)
        sync()
        times.append(time.perf_counter() - t)
    assert tuple(out.shape) == (a.res, 1, a.res, a.res), out.shape
    return {"s_per_volume": statistics.median(times), "first_call_s": first}

  out = {"framework": "torch", "version": torch.__version__, "res": a.res,
         "device": torch.cuda.get_device_name(0) if gpu else _cpu_name(),
         "threads": torch.get_num_threads(), "train": {}}
  for b in a.batch:
    out["train"][str(b)] = _guarded(train, b)
  out["decode"] = _guarded(decode)
  return out


def jax_worker(a) -> dict:
  """Times the project's JAX code; returns the process's JSON record."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  sys.path.insert(0, ROOT)
  from slicevae_jax import parallel
  from slicevae_jax.models import slice_vae
  from slicevae_jax.slicevae import inference, train as train_lib

  if a.device == "gpu" and jax.default_backend() != "gpu":
    raise SystemExit(f"--device gpu: JAX's default backend is {jax.default_backend()}")
  mesh = parallel.make_mesh()
  dev = jax.devices()[0]

  def peak_gib():
    stats = dev.memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats else None

  def train(batch):
    config = _config(a.res, batch)
    model = slice_vae.from_config(config)
    tx = train_lib.make_optimizer(config)
    state = train_lib.create_state(model, tx, mesh, jax.random.key(0))
    step = train_lib.make_train_step(model, tx, float(config.train.kl_weight), mesh)
    x = parallel.global_batch(np.random.default_rng(0).random((batch, a.res, a.res, 1),
                                                              np.float32), mesh, batch)
    key = jax.random.key(1)
    t = time.perf_counter()
    state, m = step(state, x, key)
    jax.block_until_ready((state, m))
    first = time.perf_counter() - t
    for _ in range(a.warmup - 1):
      state, m = step(state, x, key)
    jax.block_until_ready((state, m))
    t = time.perf_counter()
    for _ in range(a.steps):
      state, m = step(state, x, key)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t) / a.steps
    if not float(m["finite"]):
      raise FloatingPointError("non-finite loss")
    return {"slices_per_s": batch / dt, "step_s": dt, "first_step_s": first,
            "peak_gib": peak_gib()}

  def decode():
    config = _config(a.res, 1)
    model = slice_vae.from_config(config)
    tx = train_lib.make_optimizer(config)
    variables = train_lib.create_state(model, tx, mesh, jax.random.key(0)).variables
    run = jax.jit(lambda v, z: slice_vae.apply_inference(model, v, z, "decode"))
    z = jax.device_put(jax.random.normal(jax.random.key(2), (a.res,) + LATENT),
                       parallel.replicated(mesh))
    t = time.perf_counter()
    jax.block_until_ready(run(variables, z))
    first = time.perf_counter() - t
    for _ in range(a.warmup - 1):
      jax.block_until_ready(run(variables, z))
    times = []
    for _ in range(a.decode_reps):
      t = time.perf_counter()
      out = jax.block_until_ready(run(variables, z))
      times.append(time.perf_counter() - t)
    assert out.shape == (a.res, a.res, a.res, 1), out.shape
    rec = {"s_per_volume": statistics.median(times), "first_call_s": first}
    if a.e2e_reps:
      # Sampling's own path: host latents [1, S, L] -> host volume, as sample_volumes calls it.
      bundle = inference.InferenceBundle(config=config, model=model, variables=variables,
                                         step=0, gaussian=None, meta={"slice_axis": 1},
                                         mesh=mesh)
      lat = np.asarray(z).reshape(1, a.res, -1)
      inference.decode_latents(bundle, lat, 1)
      e2e = []
      for _ in range(a.e2e_reps):
        t = time.perf_counter()
        inference.decode_latents(bundle, lat, 1)
        e2e.append(time.perf_counter() - t)
      rec["decode_latents_s_per_volume"] = statistics.median(e2e)
    return rec

  out = {"framework": "jax", "version": jax.__version__, "res": a.res,
         "device": f"{dev.device_kind} ({dev.platform})" if dev.platform != "cpu"
                   else _cpu_name(),
         "devices": jax.device_count(), "train": {}}
  for b in a.batch:
    out["train"][str(b)] = _guarded(train, b)
  out["decode"] = _guarded(decode)
  return out


# --- the parent: alternating rounds, medians, the section -----------------------------

def _run_worker(framework: str, res: int, a, cache_dir: str | None) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--res", str(res),
         "--batch", *map(str, a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
         "--decode-reps", str(a.decode_reps), "--e2e-reps", str(a.e2e_reps),
         "--device", a.device]
  env = dict(os.environ)
  if framework == "jax":
    if a.device == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
    if cache_dir:
      env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
      env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
      env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  t = time.perf_counter()
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout,
                       check=False)
  except subprocess.TimeoutExpired:
    return {"framework": framework, "res": res, "error": f"timed out after {a.timeout} s"}
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
  if p.returncode or not lines:
    tail = " | ".join(p.stderr.strip().splitlines()[-3:])
    return {"framework": framework, "res": res, "error": f"exit {p.returncode}: {tail}"}
  out = json.loads(lines[-1])
  out["wall_s"] = time.perf_counter() - t
  return out


def _median(values: list) -> float | None:
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def _fmt(v, spec: str) -> str:
  return "failed" if v is None else format(v, spec)


def _ratio(num, den) -> str:
  return "—" if num is None or den is None else f"{num / den:.2f}"


def _section(a, runs: dict, argv: list[str]) -> list[str]:
  """The RESULTS.md section: tables of medians, then every round's values."""
  meta = {fw: next((r for rs in runs.values() for r in rs.get(fw, []) if "version" in r), {})
          for fw in ("torch", "jax")}
  dev = meta["jax"].get("device") or meta["torch"].get("device") or "?"
  if a.device == "gpu" and (meta["torch"].get("device") or "") not in dev:
    dev = f"torch: {meta['torch'].get('device', '?')}; JAX: {meta['jax'].get('device', '?')}"
  threads = meta["torch"].get("threads")
  lines = [
      f"\n## JAX vs PyTorch reference (slice VAE), {datetime.date.today()} — {a.device}: "
      f"{dev}, {platform.machine()}, {os.cpu_count()} CPUs, JAX {meta['jax'].get('version', '?')}"
      f", torch {meta['torch'].get('version', '?')}, Python {platform.python_version()}",
      "",
      f"Command: `python bench/bench_vs_torch.py {' '.join(argv)}`".rstrip(),
      "",
      f"Float32, random slices. Median of {a.rounds} round(s), each one torch and one JAX "
      f"subprocess per resolution, order swapped every round; training: {a.steps} timed steps "
      f"after {a.warmup} warm-up step(s) (JAX: the project's jitted train step; torch: "
      f"zero_grad/forward/backward/Adam)"
      + (f", torch on {threads} CPU threads" if a.device == "cpu" and threads else "")
      + f"; decode: one volume (res slices), median of {a.decode_reps} synchronised calls per "
      "process, running BatchNorm statistics. jax/torch > 1: JAX has more slices/s (training) "
      "or takes longer (decode).",
      "",
      "| res | batch | torch slices/s | jax slices/s | jax/torch |",
      "|---|---|---|---|---|",
  ]
  raw = []
  for res in a.res:
    for b in a.batch:
      vals = {fw: [r.get("train", {}).get(str(b), {}).get("slices_per_s")
                   for r in runs[res].get(fw, [])] for fw in ("torch", "jax")}
      t, j = _median(vals["torch"]), _median(vals["jax"])
      lines.append(f"| {res}² | {b} | {_fmt(t, '.1f')} | {_fmt(j, '.1f')} | {_ratio(j, t)} |")
      raw.append(f"{res}² batch {b} slices/s: torch "
                 + ", ".join(_fmt(v, ".1f") for v in vals["torch"]) + "; jax "
                 + ", ".join(_fmt(v, ".1f") for v in vals["jax"]))
  lines += ["", "| res | slices | torch decode s/vol | jax decode s/vol | jax/torch | "
            "jax `decode_latents` s/vol (end to end) |", "|---|---|---|---|---|---|"]
  for res in a.res:
    vals = {fw: [r.get("decode", {}).get("s_per_volume") for r in runs[res].get(fw, [])]
            for fw in ("torch", "jax")}
    e2e = [r.get("decode", {}).get("decode_latents_s_per_volume")
           for r in runs[res].get("jax", [])]
    t, j, e = _median(vals["torch"]), _median(vals["jax"]), _median(e2e)
    lines.append(f"| {res}² | {res} | {_fmt(t, '.4g')} | {_fmt(j, '.4g')} | {_ratio(j, t)} | "
                 + ("—" if not a.e2e_reps else _fmt(e, ".4g")) + " |")
    raw.append(f"{res}² decode s/vol: torch " + ", ".join(_fmt(v, ".4g") for v in vals["torch"])
               + "; jax " + ", ".join(_fmt(v, ".4g") for v in vals["jax"])
               + ("; jax decode_latents " + ", ".join(_fmt(v, ".4g") for v in e2e)
                  if a.e2e_reps else ""))
  for res in a.res:
    for fw in ("torch", "jax"):
      for i, r in enumerate(runs[res].get(fw, [])):
        firsts = ", ".join(
            f"batch {b} {_fmt(r.get('train', {}).get(str(b), {}).get('first_step_s'), '.1f')}"
            for b in a.batch)
        peaks = [r.get("train", {}).get(str(b), {}).get("peak_gib") for b in a.batch]
        errors = [f"{k}: {v['error']}" for k, v in
                  list(r.get("train", {}).items()) + [("decode", r.get("decode", {}))]
                  if isinstance(v, dict) and "error" in v]
        if "error" in r:
          errors.append(r["error"])
        raw.append(f"{res}² {fw} round {i + 1}: first step s (compile/autotune + 1 step) "
                   f"{firsts}; decode first call "
                   f"{_fmt(r.get('decode', {}).get('first_call_s'), '.1f')} s"
                   + ("; peak GiB " + ", ".join(_fmt(p, ".2f") for p in peaks)
                      if any(p is not None for p in peaks) else "")
                   + (f"; process wall {r['wall_s']:.0f} s" if "wall_s" in r else "")
                   + ("; ERRORS " + "; ".join(errors) if errors else ""))
  lines += ["", "Per-round values:", ""] + [f"- {x}" for x in raw]
  return lines


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--res", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--batch", type=int, nargs="+", default=[32, 128])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=20, help="timed training steps per process")
  p.add_argument("--warmup", type=int, default=3,
                 help="untimed calls first (the first compiles / autotunes); at least 1")
  p.add_argument("--decode-reps", type=int, default=10, help="timed decodes per process")
  p.add_argument("--e2e-reps", type=int, default=2,
                 help="timed inference.decode_latents calls per JAX process (0: skip)")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
  p.add_argument("--jax-cache", default="",
                 help="persistent compilation cache folder for the JAX processes (default none)")
  p.add_argument("--append", action="store_true", help="add the section to --out")
  p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
  p.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
  a = p.parse_args()
  a.warmup = max(1, a.warmup)
  if a.worker:
    a.res = a.res[0]
    rec = torch_worker(a) if a.worker == "torch" else jax_worker(a)
    print(json.dumps(rec), flush=True)
    return

  runs: dict[int, dict[str, list[dict]]] = {res: {"torch": [], "jax": []} for res in a.res}
  for rnd in range(a.rounds):
    order = ("torch", "jax") if rnd % 2 == 0 else ("jax", "torch")
    for res in a.res:
      for fw in order:
        r = _run_worker(fw, res, a, a.jax_cache or None)
        runs[res][fw].append(r)
        print(f"round {rnd + 1} {res}² {fw}: {json.dumps(r)}", flush=True)
  lines = _section(a, runs, sys.argv[1:])
  if a.append:
    with open(a.out, "a", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
