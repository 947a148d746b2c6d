r"""Registration against a git ref: paired, alternating timing and old-vs-new accuracy.

  python bench/reg_compare.py --ref main --res 64 --rounds 4
  python bench/bench_eval.py --compare-ref main --res 64 128     # the same, per resolution

Problems (2q pairs, registered in one vmapped call of `register_affine`, the RAS's shape):
q pairs 'self': subject i of the embedded synthetic set (data/synth.py) at res³, moved by a
known random affine (±10°, scale 0.9-1.1, shift ±0.1) and registered back onto itself, so the
truth is known; q pairs 'inter': subject i registered onto subject i + 1, as the RAS does.
The volumes are made once by this tree and cached in the temp folder.

REF is checked out with `git worktree add --detach` into a temporary folder (removed at the
end). Each round runs one child process per tree, the order swapped every round; a child
imports the package from its tree, compiles with one call (excluded), then times `--repeats`
calls. The machine is shared, so read the ratios of the medians (wall and process CPU
seconds), not single times. Accuracy is scored by this tree for both parameter sets:
displacement between the two transforms over the fixed brain (voxels, RMS and max), the
residual to the truth of the self pairs, and mean Dice of the warped labels.
"""

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NUM_LABELS = 15


def _problems(res: int, q: int, seed: int) -> str:
  """Builds (or reuses) the npz of 2q pairs at res³ and returns its path."""
  path = os.path.join(tempfile.gettempdir(), f"reg_compare_{res}_{q}_{seed}.npz")
  if os.path.exists(path):
    return path
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from slicevae_jax import config_lib  # pylint: disable=import-outside-toplevel
  from slicevae_jax.data import synth  # pylint: disable=import-outside-toplevel
  from slicevae_jax.metrics import registration as reg  # pylint: disable=import-outside-toplevel
  config = config_lib.base_config()
  config.data.grid, config.data.voxel_size = res, 0.7 * 256 / res
  subjects = [synth.generate_subject(i, config)[:2] for i in range(q + 1)]
  images = np.stack([s[0] for s in subjects]).astype(np.float32)
  labels = np.stack([s[1] for s in subjects]).astype(np.int32)
  keys = jax.random.split(jax.random.key(seed), q)
  truth = np.asarray(jax.vmap(reg.random_affine)(keys))
  moved = np.asarray(reg.warp(jnp.asarray(images[:q]), truth))
  moved_labels = np.asarray(reg.warp_labels(jnp.asarray(labels[:q]), truth))
  np.savez(path, moving=np.concatenate([moved, images[:q]]),
           moving_labels=np.concatenate([moved_labels, labels[:q]]),
           fixed=np.concatenate([images[:q], images[1:q + 1]]),
           fixed_labels=np.concatenate([labels[:q], labels[1:q + 1]]), truth=truth)
  return path


def child(args: argparse.Namespace) -> None:
  """Times register_affine of the tree at args.root on the problems; writes a json."""
  sys.path.insert(0, args.root)
  import jax  # pylint: disable=import-outside-toplevel
  from slicevae_jax.metrics import registration as reg  # pylint: disable=import-outside-toplevel
  assert os.path.dirname(os.path.abspath(reg.__file__)).startswith(os.path.abspath(args.root))
  data = np.load(args.data)
  kw = json.loads(args.reg_json)
  # Settings this tree's register_affine does not know (an older ref) are left out and
  # reported: e.g. fine_stride 2 for the new tree is then compared with the ref's full grid.
  known = inspect.signature(reg.register_affine).parameters
  dropped = {k: kw.pop(k) for k in list(kw) if k not in known}
  run = lambda: jax.block_until_ready(reg.register_affine(data["moving"], data["fixed"], **kw))
  t = time.perf_counter()
  params = run()
  first = time.perf_counter() - t
  wall, cpu = [], []
  for _ in range(args.repeats):
    t, c = time.perf_counter(), time.process_time()
    run()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"params": np.asarray(params).tolist(), "wall": wall, "cpu": cpu,
               "first": first, "dropped": dropped}, f)


def _score(data, params: np.ndarray) -> dict:
  """Accuracy of one parameter set, scored with this tree's warp and Dice."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from slicevae_jax.metrics import registration as reg  # pylint: disable=import-outside-toplevel
  q = len(data["truth"])
  warped = reg.warp_labels(jnp.asarray(data["moving_labels"]), jnp.asarray(params))
  dice = np.asarray(reg.mean_dice(warped, jnp.asarray(data["fixed_labels"]), NUM_LABELS))
  residual = np.asarray(reg.compose_params(jnp.asarray(data["truth"]), jnp.asarray(params[:q])))
  return {"dice_self": dice[:q], "dice_inter": dice[q:],
          "residual_vox": [_displacement(data["fixed"][i], residual[i], np.zeros(12))
                           for i in range(q)]}


def _displacement(fixed: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> tuple[float, float]:
  """(RMS, max) over the fixed brain of |T1(x) - T2(x)| in voxels."""
  n = fixed.shape
  scale = max(n) / 2
  idx = np.argwhere(fixed > 0).astype(np.float64)
  x = (idx + 0.5 - np.asarray(n) / 2) / scale
  a = lambda p: np.eye(3) + np.asarray(p[:9], np.float64).reshape(3, 3)
  d = x @ (a(p1) - a(p2)).T + (np.asarray(p1[9:]) - np.asarray(p2[9:]))
  norm = np.linalg.norm(d, axis=1) * scale
  return float(np.sqrt(np.mean(norm ** 2))), float(norm.max())


def compare(ref: str, res: int, q: int, rounds: int, repeats: int, reg_kwargs: dict,
            seed: int = 0) -> dict:
  """Runs the paired comparison at one resolution; returns (and prints) its summary."""
  data_path = _problems(res, q, seed)
  tmp = tempfile.mkdtemp(prefix="reg_ref_")
  ref_root = os.path.join(tmp, "tree")
  subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", ref_root, ref], check=True,
                 capture_output=True)
  trees = {"ref": ref_root, "new": ROOT}
  runs = {k: [] for k in trees}
  try:
    for r in range(rounds):
      for name in (("ref", "new") if r % 2 == 0 else ("new", "ref")):
        out = os.path.join(tmp, f"{name}_{r}.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--root",
                        trees[name], "--data", data_path, "--out", out, "--repeats",
                        str(repeats), "--reg-json", json.dumps(reg_kwargs)], check=True)
        with open(out, encoding="utf-8") as f:
          runs[name].append(json.load(f))
        print(f"  {res}³ round {r} {name}: wall {runs[name][-1]['wall']}", file=sys.stderr,
              flush=True)
  finally:
    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", ref_root], check=False)
    shutil.rmtree(tmp, ignore_errors=True)
  data = np.load(data_path)
  pairs = 2 * q
  med = lambda name, key: statistics.median(t / pairs for run in runs[name] for t in run[key])
  out = {"res": res, "pairs": pairs, "rounds": rounds, "repeats": repeats, "ref": ref,
         "settings": reg_kwargs, "ref_ignored": runs["ref"][0]["dropped"]}
  for key in ("wall", "cpu"):
    out[f"ref_{key}_pair_s"], out[f"new_{key}_pair_s"] = med("ref", key), med("new", key)
    out[f"speedup_{key}"] = out[f"ref_{key}_pair_s"] / out[f"new_{key}_pair_s"]
  out["first_call_s"] = {k: statistics.median(run["first"] for run in runs[k]) for k in runs}
  params = {k: np.asarray(runs[k][0]["params"], np.float32) for k in runs}
  for k in runs:   # every round of one tree should give the same parameters
    out[f"{k}_rounds_max_param_diff"] = max(
        float(np.max(np.abs(np.asarray(run["params"]) - params[k]))) for run in runs[k])
  between = [_displacement(data["fixed"][i], params["new"][i], params["ref"][i])
             for i in range(pairs)]
  out["new_vs_ref_disp_vox_rms_max"] = [max(b[0] for b in between), max(b[1] for b in between)]
  out["new_vs_ref_max_param_diff"] = float(np.max(np.abs(params["new"] - params["ref"])))
  for k in runs:
    s = _score(data, params[k])
    out[f"{k}_dice_self"] = float(np.mean(s["dice_self"]))
    out[f"{k}_dice_inter"] = float(np.mean(s["dice_inter"]))
    out[f"{k}_residual_vox_rms_max"] = [max(r[0] for r in s["residual_vox"]),
                                        max(r[1] for r in s["residual_vox"])]
  out["max_abs_dice_diff"] = float(np.max(np.abs(
      np.concatenate(list(_score(data, params["new"]).values())[:2])
      - np.concatenate(list(_score(data, params["ref"]).values())[:2]))))
  print(json.dumps(out, indent=1))
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ref", default="main")
  p.add_argument("--res", type=int, nargs="+", default=[64])
  p.add_argument("--q", type=int, default=2, help="self pairs (as many inter-subject pairs)")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--iters", type=int, nargs="+", default=[150, 100, 50])
  p.add_argument("--fine-stride", type=int, default=1, help="new tree only, if ref lacks it")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--root", help=argparse.SUPPRESS)
  p.add_argument("--data", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  p.add_argument("--reg-json", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(args)
    return
  for res in args.res:
    compare(args.ref, res, args.q, args.rounds, args.repeats,
            {"levels": len(args.iters), "iters": args.iters, "fine_stride": args.fine_stride})


if __name__ == "__main__":
  main()
