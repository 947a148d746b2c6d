"""Density tools on a trained workdir: score, complete, interpolate volumes; audit memorisation.

Sits after the latent stage: volumes on the model grid are encoded to posterior-mean
stacks y [N, S, L] (`inference.encode_stacks`), the workdir's latent Gaussian
(`latent_gaussian`, paper §2.1 for per_dim) gives their closed-form log density and
the closed-form conditional of some slices given others, and the decoder
(`inference.decode_latents`) maps stacks back to volumes. Arrays in, arrays out; the
file-writing modes of `main` (`density_stages`) wrap these functions.

    from slicevae_jax import load_for_inference, density
    bundle = load_for_inference("runs/demo")
    scores = density.score_volumes(bundle, volumes, reference=held_out)
    done = density.complete_volume(bundle, volume, density.keep_every(64, 4), jax.random.key(0))

Every log density here is of the latent codes (nats per stack of posterior means),
not of the image: two volumes with the same codes have the same score whatever the
decoder makes of them. Volumes are [N, X, Y, Z] in [0, 1] on the cache's grid.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from slicevae_jax.slicevae import inference
from slicevae_jax.slicevae import latent as lg
from slicevae_jax.data.cache import to_stack, to_volume
from slicevae_jax.errors import DataError

EPS = 1e-3   # the isotropic noise that makes the low-rank Gaussian proper (lg.log_density)


# ----------------------------------------------------------------------------- helpers


def _stacks(volumes: np.ndarray, slice_axis: int) -> np.ndarray:
  return np.stack([to_stack(np.asarray(v, np.float32), slice_axis) for v in volumes])


def encode_volumes(bundle: inference.InferenceBundle, volumes: np.ndarray) -> np.ndarray:
  """Posterior-mean stacks of volumes: [N, X, Y, Z] -> [N, S, L]."""
  return inference.encode_stacks(bundle, _stacks(volumes, bundle.slice_axis),
                                 int(bundle.config.latent.encode_batch))


def decode_stacks(bundle: inference.InferenceBundle, latents: np.ndarray) -> np.ndarray:
  """Volumes of latent stacks: [N, S, L] -> [N, X, Y, Z] in [0, 1]."""
  return inference.decode_latents(bundle, latents, int(bundle.config.sample.batch_volumes))


def _gaussian(bundle: inference.InferenceBundle,
              gaussian: lg.LatentGaussian | None) -> lg.LatentGaussian:
  g = gaussian if gaussian is not None else bundle.gaussian
  if g is None:
    raise DataError("this bundle has no latent Gaussian; run --mode=fit_latent first")
  return g


def reconstruction_error(reconstructed: np.ndarray, real: np.ndarray) -> dict[str, float]:
  """Mean squared error and PSNR (peak 1) of volumes in [0, 1] against their originals."""
  err = np.mean(np.square(np.asarray(reconstructed, np.float64) - np.asarray(real, np.float64)),
                axis=(1, 2, 3))
  psnr = 10.0 * np.log10(1.0 / np.maximum(err, 1e-12))
  return {"mse": float(err.mean()), "psnr": float(psnr.mean()), "num_volumes": int(len(err))}


def percentile_of(values: np.ndarray, reference: np.ndarray, higher_is_typical: bool = True
                  ) -> np.ndarray:
  """Share (%) of `reference` that is at most as typical as each value: [N] -> [N] in [0, 100].

  0 means less typical than every reference volume, 100 at least as typical as all of
  them. `higher_is_typical` False for errors (a larger error is less typical).
  """
  v = np.asarray(values, np.float64)[:, None]
  r = np.asarray(reference, np.float64)[None, :]
  below = (r <= v) if higher_is_typical else (r >= v)
  return 100.0 * below.mean(axis=1)


# ----------------------------------------------------------------------------- score


def slice_log_density(g: lg.LatentGaussian, y: np.ndarray, eps: float = EPS) -> np.ndarray:
  """log p(y_s | every other slice of the stack) for each slice s: [N, S, L] -> [N, S].

  The leave-one-slice-out conditional of the model N(μ, B Bᵀ + eps·I) of `lg.log_density`:
  where along the slice axis a stack departs from what the rest of it predicts. The terms do
  not sum to log p(y) (each conditions on all other slices). Per group of the model's view,
  with factors W [S, d, P] (d = 1 row per slice for per_dim and rotated, d = L for joint),
  C = εI + WᵀW and the precision Λ = (WWᵀ + εI)⁻¹ = ε⁻¹(I − W C⁻¹ Wᵀ) (Woodbury), slice s
  has Λ_ss = ε⁻¹K_s with K_s = I_d − W_s C⁻¹ W_sᵀ and (Λv)_s = ε⁻¹u_s with
  u = v − W C⁻¹ Wᵀ v, so log p(v_s | rest) = −½(u_sᵀK_s⁻¹u_s / ε + d log ε − log|K_s| +
  d log 2π). For d > P, K_s⁻¹ and |K_s| come from the P×P matrix C − W_sᵀW_s instead.
  Every slice at once, in float64 on the host.
  """
  y = np.asarray(y, np.float64)
  if y.ndim != 3 or y.shape[1:] != (g.num_slices, g.latent_dim):
    raise ValueError(f"y must be [N, S, L] with [S, L] = {(g.num_slices, g.latent_dim)}, "
                     f"got {y.shape}")
  n, s_num = y.shape[:2]
  w = np.asarray(g.W, np.float64)                                     # [G, S', P]
  groups, _, p = w.shape
  # pylint: disable-next=protected-access
  v = np.asarray(lg._view(g, y - np.asarray(g.mean, np.float64)))     # [N, S', G]
  v = np.moveaxis(v, -1, 1)                                           # [N, G, S']
  c = eps * np.eye(p) + np.swapaxes(w, 1, 2) @ w                      # [G, P, P]
  c_inv = np.linalg.inv(c)
  u = v - ((w @ c_inv)[None] @ (v[:, :, None, :] @ w[None])[..., 0, :, None])[..., 0]
  w = w.reshape(groups, s_num, -1, p)                                 # [G, S, d, P]
  u = u.reshape(n, groups, s_num, -1)                                 # [N, G, S, d]
  d = w.shape[2]
  w_t = np.swapaxes(w, 2, 3)                                          # [G, S, P, d]
  if d <= p:
    k = np.eye(d) - w @ c_inv[:, None] @ w_t                          # [G, S, d, d]
    _, logdet_k = np.linalg.slogdet(k)
    quad = np.sum(u * (np.linalg.inv(k)[None] @ u[..., None])[..., 0], axis=-1)
  else:
    a = c[:, None] - w_t @ w                                          # [G, S, P, P]
    _, logdet_a = np.linalg.slogdet(a)
    logdet_k = logdet_a - np.linalg.slogdet(c)[1][:, None]
    t = (w_t[None] @ u[..., None])[..., 0]                            # [N, G, S, P]
    quad = np.sum(u * u, axis=-1) + np.sum(t * (np.linalg.inv(a)[None] @ t[..., None])[..., 0],
                                          axis=-1)
  per_group = -0.5 * (quad / eps + d * np.log(eps) - logdet_k + d * np.log(2 * np.pi))
  return np.sum(per_group, axis=1)                                    # [N, S]


@dataclasses.dataclass
class Scores:
  """What `score_volumes` returns. N scored volumes, M reference volumes, S slices.

  Attributes:
    log_density: {model kind: [N]} log p(y) of each volume's posterior-mean stack, nats.
    log_density_percentile: {kind: [N]} % of reference volumes with a log density ≤ it.
    slice_log_density: {kind: [N, S]} `slice_log_density` of each volume.
    recon_mse: [N] mean squared error of encode -> decode against the volume.
    recon_percentile: [N] % of reference volumes with a reconstruction error ≥ it.
    reconstructions: [N, X, Y, Z] the decoded posterior means.
    reference: the same fields for the reference volumes (no reconstructions).
  """
  log_density: dict[str, np.ndarray]
  log_density_percentile: dict[str, np.ndarray]
  slice_log_density: dict[str, np.ndarray]
  recon_mse: np.ndarray
  recon_percentile: np.ndarray
  reconstructions: np.ndarray
  reference: dict[str, Any]


def _densities(gaussians: dict[str, lg.LatentGaussian], y: np.ndarray, eps: float
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  total = {k: np.asarray(lg.log_density(g, y, eps), np.float64) for k, g in gaussians.items()}
  per_slice = {k: slice_log_density(g, y, eps) for k, g in gaussians.items()}
  return total, per_slice


def _recon(bundle, volumes: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  recon = decode_stacks(bundle, y)
  err = np.mean(np.square(recon.astype(np.float64) - np.asarray(volumes, np.float64)),
                axis=(1, 2, 3))
  return recon, err


def reference_scores(bundle: inference.InferenceBundle, reference: np.ndarray,
                     gaussians: dict[str, lg.LatentGaussian] | None = None,
                     eps: float = EPS) -> dict[str, Any]:
  """Scores of the reference volumes, computed once (a model bundle stores them):
  {'log_density': {kind: [M]}, 'slice_log_density': {kind: [M, S]}, 'recon_mse': [M]}."""
  gaussians = gaussians or {_gaussian(bundle, None).kind: bundle.gaussian}
  reference = np.asarray(reference, np.float32)
  if len(reference) < 1:
    raise DataError("scoring needs at least one reference (held-out) volume")
  y_ref = encode_volumes(bundle, reference)
  ref_total, ref_slice = _densities(gaussians, y_ref, eps)
  _, ref_err = _recon(bundle, reference, y_ref)
  return {"log_density": ref_total, "slice_log_density": ref_slice, "recon_mse": ref_err}


def score_volumes(bundle: inference.InferenceBundle, volumes: np.ndarray,
                  reference: np.ndarray | dict[str, Any],
                  gaussians: dict[str, lg.LatentGaussian] | None = None,
                  eps: float = EPS) -> Scores:
  """How typical each volume is: latent log density, reconstruction error, percentiles.

  Two scores, because they fail differently. The log density of the posterior-mean stack
  (of the latent codes, not of the image) is low for an unusual anatomy and for anything
  the encoder maps off the latent model's subspace, where `eps` alone decides how low.
  The reconstruction error does not involve the latent model at all: a scan the slice VAE
  cannot reproduce (not a brain, another contrast, corrupt) has a large one, an unusual
  but brain-like anatomy does not. Percentiles are against `reference`, normally the
  cache's held-out real volumes.

  Args:
    bundle: from `inference.load_for_inference`.
    volumes: [N, X, Y, Z] in [0, 1] on the model grid.
    reference: [M, X, Y, Z] held-out real volumes on the same grid (M >= 1), or their
      `reference_scores` (with an entry for every model of `gaussians`).
    gaussians: {kind: LatentGaussian} (default: the bundle's, under its kind).
    eps: isotropic noise of the density (`lg.log_density`).
  """
  gaussians = gaussians or {_gaussian(bundle, None).kind: bundle.gaussian}
  ref = (reference if isinstance(reference, dict)
         else reference_scores(bundle, reference, gaussians, eps))
  missing = sorted(set(gaussians) - set(ref["log_density"]))
  if missing:
    raise DataError(f"the reference scores have no latent model {missing}")
  ref_total, ref_slice, ref_err = ref["log_density"], ref["slice_log_density"], ref["recon_mse"]
  volumes = np.asarray(volumes, np.float32)
  y = encode_volumes(bundle, volumes)
  total, per_slice = _densities(gaussians, y, eps)
  recon, err = _recon(bundle, volumes, y)
  return Scores(
      log_density=total,
      log_density_percentile={k: percentile_of(total[k], ref_total[k]) for k in total},
      slice_log_density=per_slice,
      recon_mse=err,
      recon_percentile=percentile_of(err, ref_err, higher_is_typical=False),
      reconstructions=recon,
      reference={"log_density": {k: ref_total[k] for k in total},
                 "slice_log_density": {k: ref_slice[k] for k in total}, "recon_mse": ref_err})


# ----------------------------------------------------------------------------- complete


def keep_every(num_slices: int, k: int, offset: int = 0) -> np.ndarray:
  """Observed-slice mask [S] of a thick-slice scan: slices offset, offset + k, ... kept."""
  if k < 1 or not 0 <= offset < k:
    raise ValueError(f"need k >= 1 and 0 <= offset < k, got k={k}, offset={offset}")
  return (np.arange(num_slices) % k) == offset


def parse_slices(spec: str, num_slices: int) -> np.ndarray:
  """Slice indices from 'a:b,c,...' (Python ranges, end excluded) -> bool mask [S]."""
  mask = np.zeros(num_slices, bool)
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    try:
      if ":" in part:
        lo, hi = (int(x) if x.strip() else None for x in part.split(":", 1))
        lo, hi = lo or 0, num_slices if hi is None else hi
        if not 0 <= lo < hi <= num_slices:
          raise ValueError
        mask[lo:hi] = True
      else:
        i = int(part)
        if not 0 <= i < num_slices:
          raise ValueError
        mask[i] = True
    except ValueError:
      raise DataError(f"slice list {spec!r}: {part!r} is not an index or range a:b within "
                      f"0..{num_slices}") from None
  return mask


@dataclasses.dataclass
class Completion:
  """What `complete_volume` returns ([X, Y, Z] volumes in [0, 1]).

  Attributes:
    mean: the decoded conditional mean, observed slices replaced by the acquired ones.
    samples: [K, X, Y, Z] decoded conditional samples, observed slices acquired.
    std: per-voxel standard deviation over the K samples (0 on observed slices).
    observed: bool [S], the slices taken as acquired.
  """
  mean: np.ndarray
  samples: np.ndarray
  std: np.ndarray
  observed: np.ndarray


def complete_volume(bundle: inference.InferenceBundle, volume: np.ndarray,
                    observed: np.ndarray, key: jax.Array, num_samples: int = 8,
                    gaussian: lg.LatentGaussian | None = None, eps: float = EPS) -> Completion:
  """Fills in the missing slices of a volume from the latent model's conditional.

  The observed slices are encoded to their posterior means y_O; the missing slices'
  latents get the closed-form conditional p(y_U | y_O) (`lg.conditional_mean`,
  `lg.conditional_sample`); its mean and `num_samples` draws are decoded. Observed slices
  are then put back exactly as acquired, so only the missing slices are generated.

  Args:
    bundle: from `inference.load_for_inference`.
    volume: [X, Y, Z] on the model grid; the content of missing slices is never read.
    observed: bool [S] along the bundle's slice axis (`keep_every`, `parse_slices`).
    key: PRNG key of the conditional samples; the same key gives the same samples.
    num_samples: K (>= 2 for a standard deviation; 0 gives the mean only).
    gaussian: the latent model (default: the bundle's).
  """
  g = _gaussian(bundle, gaussian)
  observed = np.asarray(observed, bool)
  if observed.shape != (g.num_slices,):
    raise DataError(f"the observed-slice mask has shape {observed.shape}; the model has "
                    f"{g.num_slices} slices along axis {bundle.slice_axis}")
  if not observed.any():
    raise DataError("no slice is observed; use --mode=sample for unconditional volumes")
  stack = to_stack(np.asarray(volume, np.float32), bundle.slice_axis)          # [S, H, W]
  # Missing slices are zeroed before encoding, so nothing of them can leak in.
  stack = np.where(observed[:, None, None], stack, 0.0)
  y = inference.encode_stacks(bundle, stack[None])[0]                          # [S, L]
  ys = [np.asarray(lg.conditional_mean(g, y, observed, eps))]
  if num_samples:
    ys += list(np.asarray(lg.conditional_sample(g, key, y, observed, int(num_samples), eps)))
  decoded = _stacks(decode_stacks(bundle, np.stack(ys)), bundle.slice_axis)     # [1+K, S, H, W]
  decoded = np.where(observed[None, :, None, None], stack[None], decoded)
  vols = np.stack([to_volume(x, bundle.slice_axis) for x in decoded])
  std = decoded[1:].std(axis=0) if num_samples > 1 else np.zeros_like(decoded[0])
  std = np.where(observed[:, None, None], 0.0, std)       # exactly 0 where acquired
  return Completion(mean=vols[0], samples=vols[1:],
                    std=to_volume(std, bundle.slice_axis).astype(np.float32), observed=observed)


# ----------------------------------------------------------------------------- interpolate


@dataclasses.dataclass
class Interpolation:
  """What `interpolate_volumes` returns (T = num_steps).

  Attributes:
    volumes: [T, X, Y, Z] decoded volumes, first and last the two subjects' reconstructions.
    t: [T] positions along the path, 0 to 1.
    factors: [T, G, P] the path in the model's factor space (`lg.to_latent`).
    log_density: [T] log p(y_t) of each step's latent stack (nats; of the codes).
    residual_fraction: [2] the share of each endpoint's centred code outside the model's
      subspace (|y − to_latent(from_latent(y))|² / |y − μ|²).
  """
  volumes: np.ndarray
  t: np.ndarray
  factors: np.ndarray
  log_density: np.ndarray
  residual_fraction: np.ndarray


def interpolate_volumes(bundle: inference.InferenceBundle, a: np.ndarray, b: np.ndarray,
                        num_steps: int = 8, gaussian: lg.LatentGaussian | None = None,
                        eps: float = EPS) -> Interpolation:
  """A straight path in the latent model's factor space between two subjects, decoded.

  Each subject is encoded (posterior means y), mapped to its factors z = `lg.from_latent`
  and to the residual r = y − `lg.to_latent`(z) that the model's subspace does not hold.
  Step t decodes `lg.to_latent`((1 − t) z_a + t z_b) + (1 − t) r_a + t r_b: the factors
  move in a straight line, and carrying the residuals makes the endpoints exactly the
  subjects' own codes, so they decode to the plain encode/decode reconstructions.

  Args:
    bundle: from `inference.load_for_inference`.
    a, b: [X, Y, Z] volumes on the model grid.
    num_steps: T >= 2 points, endpoints included.
    gaussian: the latent model (default: the bundle's).
  """
  if num_steps < 2:
    raise DataError(f"interpolation needs at least 2 steps (the endpoints), got {num_steps}")
  g = _gaussian(bundle, gaussian)
  y = encode_volumes(bundle, np.stack([a, b]))                       # [2, S, L]
  z = np.asarray(lg.from_latent(g, y))                               # [2, G, P]
  r = y - np.asarray(lg.to_latent(g, z))
  centred = np.sum(np.square(y - np.asarray(g.mean)), axis=(1, 2))
  t = np.linspace(0.0, 1.0, int(num_steps))
  zt = (1 - t)[:, None, None] * z[0] + t[:, None, None] * z[1]
  yt = np.asarray(lg.to_latent(g, zt)) + (1 - t)[:, None, None] * r[0] + t[:, None, None] * r[1]
  yt[0], yt[-1] = y[0], y[1]          # exactly the codes, free of rounding in the round trip
  return Interpolation(
      volumes=decode_stacks(bundle, yt), t=t, factors=zt,
      log_density=np.asarray(lg.log_density(g, yt, eps), np.float64),
      residual_fraction=np.sum(np.square(r), axis=(1, 2)) / np.maximum(centred, 1e-30))


# ----------------------------------------------------------------------------- audit


def _nearest(queries: np.ndarray, pool: Sequence[np.ndarray], chunk: int = 8
             ) -> tuple[np.ndarray, np.ndarray]:
  """Nearest pool item per query by root-mean-square difference: (index [Q], rms [Q]).

  `pool` is any sequence (a list, an array, a memory map); it is read `chunk` items at a
  time, so a large training set never sits in memory at once. Candidates are ranked with
  |q|² − 2 q·p + |p|² (one matrix product per chunk); the winner's distance is then
  recomputed from the difference itself, so a near-copy shows a distance near 0, not the
  rounding error of that expansion.
  """
  q = np.asarray(queries, np.float32).reshape(len(queries), -1)
  q_norm = np.sum(np.square(q, dtype=np.float64), axis=1)
  best = np.full(len(q), np.inf)
  arg = np.full(len(q), -1, np.int64)
  item = lambda i: np.asarray(pool[i], np.float32).reshape(-1)
  for start in range(0, len(pool), chunk):
    block = np.stack([item(i) for i in range(start, min(start + chunk, len(pool)))])
    d2 = (q_norm[:, None] - 2.0 * (q @ block.T).astype(np.float64)
          + np.sum(np.square(block, dtype=np.float64), axis=1)[None, :])
    j = np.argmin(d2, axis=1)
    dj = d2[np.arange(len(q)), j]
    better = dj < best
    best[better], arg[better] = dj[better], start + j[better]
  rms = np.array([np.sqrt(np.mean(np.square(q[i] - item(a), dtype=np.float64)))
                  for i, a in enumerate(arg)])
  return arg, rms


def closer_fraction(d_query: np.ndarray, d_heldout: np.ndarray,
                    same: bool = False) -> float:
  """Share of (query, held-out) pairs where the query is nearer the training set.

  d_query [Q], d_heldout [H]: each one's distance to its nearest training volume. With
  `same` the queries are the held-out volumes themselves and pairs (i, i) are skipped;
  ties count one half. A model that generalises gives ≈ 0.5 (its samples sit as far from
  the training set as unseen real subjects do); a model that copies gives ≈ 1.
  """
  q, h = np.asarray(d_query, np.float64)[:, None], np.asarray(d_heldout, np.float64)[None]
  wins = (q < h) + 0.5 * (q == h)
  if same:
    np.fill_diagonal(wins, np.nan)
  return float(np.nanmean(wins))


def memorisation_audit(samples: np.ndarray, train: Sequence[np.ndarray],
                       heldout: np.ndarray, latents: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
  """For each sample, its nearest training and held-out volume, and the copy statistics.

  Distances are root-mean-square differences, in voxel space (volumes) and, when
  `latents` is given, in latent space (posterior-mean stacks). Per space:

    closer_to_train: `closer_fraction` of the samples against the held-out volumes —
      the share of (sample, held-out) pairs in which the sample is nearer its nearest
      training volume than the held-out volume is to its own; reference: the same for
      held-out volumes against each other (0.5 up to ties). Well above 0.5 = copying.
    below_all_heldout: share of samples nearer the training set than every held-out
      volume; reference: the same for each held-out volume against the others.
    nearer_train_than_heldout: share of samples nearer their nearest training volume than
      their nearest held-out volume; reference: the same for each held-out volume, with the
      other held-out volumes as its held-out set. Blurry, mean-like samples lie near every
      volume and raise the first two statistics somewhat; this one compares a sample with
      both sets and is not fooled by that (it depends on the sizes of the two sets, which
      the reference shares up to one volume).

  Args:
    samples: [Q, X, Y, Z] generated volumes.
    train: training volumes, any sequence of [X, Y, Z] (read a few at a time).
    heldout: [H, X, Y, Z] held-out real volumes (H >= 2).
    latents: optional {'samples': [Q, S, L], 'train': [M, S, L], 'heldout': [H, S, L]}.

  Returns:
    {'voxel': {...}, 'latent': {...} (with `latents`)}, each with per-sample
    nearest_train [Q], d_train [Q], nearest_heldout [Q], d_heldout [Q], the held-out
    volumes' heldout_d_train [H], and the two statistics with their references.
  """
  if len(heldout) < 2:
    raise DataError("the memorisation audit needs at least 2 held-out volumes")
  spaces = {"voxel": (samples, train, heldout)}
  if latents is not None:
    spaces["latent"] = (latents["samples"], latents["train"], latents["heldout"])
  out = {}
  for space, (s, tr, ho) in spaces.items():
    nt, dt = _nearest(s, tr)
    nh, dh = _nearest(s, ho)
    _, ho_dt = _nearest(ho, tr)
    floor = np.array([np.min(np.delete(ho_dt, i)) for i in range(len(ho_dt))])
    # Each held-out volume's nearest other held-out volume.
    ho_dh = np.array([_nearest(ho[i:i + 1], np.delete(np.asarray(ho), i, axis=0))[1][0]
                      for i in range(len(ho))])
    out[space] = {
        "nearest_train": nt, "d_train": dt, "nearest_heldout": nh, "d_heldout": dh,
        "heldout_d_train": ho_dt,
        "closer_to_train": closer_fraction(dt, ho_dt),
        "closer_to_train_reference": closer_fraction(ho_dt, ho_dt, same=True),
        "below_all_heldout": float(np.mean(dt < ho_dt.min())),
        "below_all_heldout_reference": float(np.mean(ho_dt < floor)),
        "nearer_train_than_heldout": float(np.mean(dt < dh)),
        "nearer_train_than_heldout_reference": float(np.mean(ho_dt < ho_dh)),
    }
  return out
