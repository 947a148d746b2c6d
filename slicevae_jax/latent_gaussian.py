"""Latent stage: encoded stacks [N, S, L] -> per-dimension Gaussian over slices -> new stacks.

Sits between the encoder (which turns N training volumes into posterior means
Y [N, S, L], S slices, L latent entries per slice) and the vmapped decoder (which
turns sampled stacks [num, S, L] back into volumes). Paper §2.1:

  p(y) = Π_l N(y_l | μ_l, Σ_l),   y_l = [y_l(1), ..., y_l(S)] ∈ R^S,

with μ_l the sample mean over volumes and Σ_l = W_l W_lᵀ the (ddof=0) sample
covariance over the slice direction, truncated to rank P. Sampling is
y_l = W_l z_l + μ_l with z_l ~ N(0, I_P). Because the model is an explicit
Gaussian, its log density and its conditionals (some slices given, the rest drawn)
are closed form; both use the proper covariance Σ_l + eps·I, see `log_density`.

Everything is batched over l; nothing ever forms or inverts an S×S matrix except
`covariance`, which exists to return one.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import zipfile
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from slicevae_jax import fileio
from slicevae_jax.errors import DataError

# Bump when the .npz layout changes; `load` refuses files it does not know.
FORMAT_VERSION = 1
_ARRAY_KEYS = ("mean", "W", "singular_values", "num_train", "meta_json", "format_version")


@flax.struct.dataclass
class LatentGaussian:
  """The fitted latent model: Π_l N(μ_l, W_l W_lᵀ) over the slice direction.

  Attributes:
    mean: μ, [S, L] float32; column l is μ_l.
    W: [L, S, P] float32; W_l = V_l[:, :P] diag(s_l[:P]) / √N, so W_l W_lᵀ is the
      sample covariance of y_l truncated to its top-P principal subspace. Its
      columns are orthogonal (W_lᵀ W_l = diag(s_l[:P]²) / N).
    singular_values: [L, K], K = min(N, S): all singular values s_l of the centred
      data X_l [N, S] in decreasing order (kept beyond P for `explained_variance`).
    num_train: N, the number of training volumes (static, not a pytree leaf).
  """

  mean: jax.Array
  W: jax.Array
  singular_values: jax.Array
  num_train: int = flax.struct.field(pytree_node=False)

  @property
  def num_slices(self) -> int:
    """S, the number of slices per stack."""
    return int(self.mean.shape[0])

  @property
  def latent_dim(self) -> int:
    """L, the number of latent entries per slice."""
    return int(self.mean.shape[1])

  @property
  def rank(self) -> int:
    """P, the number of latent factors per dimension (columns of W_l)."""
    return int(self.W.shape[-1])


# ----------------------------------------------------------------------------- fit


@functools.partial(jax.jit, static_argnames=("rank",))
def _fit(y: jax.Array, rank: int) -> LatentGaussian:
  n = y.shape[0]
  mean = jnp.mean(y, axis=0)                                   # [S, L]
  # One batched SVD over l: X_l = Y_l - μ_l laid out as [L, N, S].
  x = jnp.transpose(y - mean, (2, 0, 1))                       # [L, N, S]
  _, s, vh = jnp.linalg.svd(x, full_matrices=False)            # s [L, K], vh [L, K, S]
  p = min(rank, s.shape[-1])
  # X_lᵀX_l / N = V diag(s²/N) Vᵀ, so V[:, :P] diag(s[:P]) / √N is its rank-P square root.
  w = jnp.swapaxes(vh[:, :p, :], 1, 2) * (s[:, None, :p] / math.sqrt(n))
  return LatentGaussian(mean=mean, W=w, singular_values=s, num_train=n)


def fit(y: jax.Array | np.ndarray, rank: int, dtype: Any = jnp.float32) -> LatentGaussian:
  """Fits μ_l and W_l for every latent dimension l from encoded training stacks.

  For each l: μ_l = (1/N) Σ_n y_l^(n), X_l = Y_l − μ_l (N×S), X_l = U diag(s) Vᵀ,
  W_l = V[:, :P] diag(s[:P]) / √N, hence W_l W_lᵀ = X_lᵀ X_l / N when P = min(N, S)
  (the ddof=0 sample covariance Σ_l of paper §2.1) and its best rank-P
  approximation otherwise. All L SVDs are one `jnp.linalg.svd` on [L, N, S].

  The effective rank is P = min(rank, N, S): the centred data has at most min(N, S)
  non-zero singular values (min(N − 1, S) in fact, the last one being ~0), so more
  columns would only add zeros.

  Memory: the SVD holds X and U, each N·S·L floats; at 256³ (N = 400, S = 256,
  L = 1024) that is ~0.4 GB each in float32, ~2 GB peak in all, which fits one
  accelerator or the host. The SVD runs in `dtype` (float32 unless x64 is enabled
  and float64 is asked for).

  Args:
    y: posterior means of the training stacks, [N, S, L].
    rank: requested number of factors per dimension (>= 1).
    dtype: compute and storage dtype.

  Returns:
    The fitted `LatentGaussian` (jit-friendly: `rank` is static, shapes come from y).
  """
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  if y.ndim != 3:
    raise ValueError(f"expected encoded stacks [N, S, L], got shape {tuple(y.shape)}")
  if y.shape[0] < 2:
    raise ValueError(f"need at least 2 volumes to estimate a covariance, got {y.shape[0]}")
  return _fit(jnp.asarray(y, dtype), int(rank))


def explained_variance(g: LatentGaussian) -> jax.Array:
  """Fraction of each dimension's total slice variance that rank P keeps, [L].

  Σ_{p<P} s_p² / Σ_k s_k², i.e. tr(W_l W_lᵀ) / tr(X_lᵀX_l / N). A dimension whose
  training codes are constant (zero variance) counts as fully explained.
  """
  s2 = jnp.square(g.singular_values)
  total = jnp.sum(s2, axis=-1)
  kept = jnp.sum(s2[:, :g.rank], axis=-1)
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)


# ----------------------------------------------------------------------------- sampling


@jax.jit
def to_latent(g: LatentGaussian, z: jax.Array) -> jax.Array:
  """Maps factors to latent stacks: y_l = W_l z_l + μ_l (paper §2.1).

  Interpolating or editing in z (e.g. along a straight line between two draws)
  and mapping through here stays inside the model's support.

  Args:
    g: the latent model.
    z: [..., L, P].

  Returns:
    y: [..., S, L].
  """
  return jnp.einsum("lsp,...lp->...sl", g.W, z) + g.mean


@jax.jit
def from_latent(g: LatentGaussian, y: jax.Array) -> jax.Array:
  """Least-squares factors of latent stacks: z_l = W_l⁺ (y_l − μ_l), [..., S, L] -> [..., L, P].

  The inverse of `to_latent` on the model's support (for y = W z + μ it returns z
  exactly when W_l has full column rank); elsewhere it drops the part of y_l
  outside span(W_l). Factors with zero singular value map to 0.
  """
  u, s, vh = jnp.linalg.svd(g.W, full_matrices=False)          # u [L,S,K], s [L,K], vh [L,K,P]
  c = jnp.einsum("lsk,...sl->...lk", u, y - g.mean)
  inv = jnp.where(s > _tiny(s), 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  return jnp.einsum("lkp,...lk->...lp", vh, c * inv)


@functools.partial(jax.jit, static_argnames=("num",))
def sample(g: LatentGaussian, key: jax.Array, num: int) -> jax.Array:
  """Draws new latent stacks: z_l ~ N(0, I_P), y_l = W_l z_l + μ_l, [num, S, L].

  The same key gives the same stacks. Decode slice by slice to get volumes.
  """
  z = jax.random.normal(key, (num, g.latent_dim, g.rank), g.W.dtype)
  return to_latent(g, z)


def covariance(g: LatentGaussian, l: int | None = None) -> jax.Array:
  """Σ_l = W_l W_lᵀ: [L, S, S] for every dimension, or [S, S] for dimension `l`."""
  if l is None:
    return jnp.einsum("lsp,ltp->lst", g.W, g.W)
  w = g.W[l]
  return w @ w.T


# ----------------------------------------------------------------------------- density


def _tiny(s: jax.Array) -> jax.Array:
  """Relative cut-off below which a singular value counts as zero, [..., 1]."""
  return jnp.max(s, axis=-1, keepdims=True) * s.shape[-1] * jnp.finfo(s.dtype).eps


def _check_eps(eps: Any) -> None:
  if isinstance(eps, (int, float)) and not eps > 0:
    raise ValueError(f"eps must be > 0 to make the covariance proper, got {eps}")


@jax.jit
def _log_density(g: LatentGaussian, y: jax.Array, eps: jax.Array) -> jax.Array:
  s_dim = g.num_slices
  # Thin SVD W_l = Q diag(σ) Rᵀ diagonalises the P×P capacitance matrix
  # εI + W_lᵀW_l = R diag(σ² + ε) Rᵀ of Woodbury's identity, so both the quadratic
  # form and the determinant come from K = min(S, P) numbers per l.
  q, sig, _ = jnp.linalg.svd(g.W, full_matrices=False)         # q [L, S, K], sig [L, K]
  lam = jnp.square(sig) + eps                                  # eigenvalues in span(W_l)
  r = y - g.mean                                               # [..., S, L]
  c = jnp.einsum("lsk,...sl->...lk", q, r)                     # coordinates in span(W_l)
  # The residual outside span(W_l) is formed explicitly rather than as |r|² − |c|²,
  # which would cancel catastrophically in float32 when divided by a small ε.
  perp = r - jnp.einsum("lsk,...lk->...sl", q, c)
  quad = jnp.sum(jnp.square(c) / lam, axis=-1) + jnp.sum(jnp.square(perp), axis=-2) / eps
  # Matrix determinant lemma: log|W Wᵀ + εI| = log|εI_K + diag(σ²)| + (S − K) log ε.
  logdet = jnp.sum(jnp.log(lam), axis=-1) + (s_dim - q.shape[-1]) * jnp.log(eps)
  per_dim = -0.5 * (quad + logdet + s_dim * math.log(2 * math.pi))   # [..., L]
  return jnp.sum(per_dim, axis=-1)


def log_density(g: LatentGaussian, y: jax.Array, eps: float = 1e-3) -> jax.Array:
  """log p(y) = Σ_l log N(y_l | μ_l, W_l W_lᵀ + eps·I), for stacks y [..., S, L] -> [...].

  W_l W_lᵀ has rank P ≤ min(N, S), so for P < S the fitted Gaussian is degenerate
  (no density off the P-dimensional subspace); eps > 0 adds isotropic slice noise
  that makes it a proper density on R^S. With the inverse via Woodbury,
  (WWᵀ + εI)⁻¹ = ε⁻¹(I − W(εI_P + WᵀW)⁻¹Wᵀ), and the determinant via the matrix
  determinant lemma, the cost is O(S·P) per dimension after an O(S·P²) factorisation;
  no S×S matrix is formed. Densities are in the units of y (nats per stack).
  """
  _check_eps(eps)
  return _log_density(g, jnp.asarray(y, g.W.dtype), jnp.asarray(eps, g.W.dtype))


# ----------------------------------------------------------------------------- conditioning


@jax.jit
def _condition(g: LatentGaussian, y_obs: jax.Array, observed: jax.Array, eps: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Posterior of the factors z_l given the observed slices, for every l.

  Writes y_l = W_l z_l + μ_l + √ε n_l with z_l ~ N(0, I_P), n_l ~ N(0, I_S), which
  has exactly the covariance W_l W_lᵀ + εI. Given y_O, z_l has precision
  A = I + W_Oᵀ W_O / ε and mean A⁻¹ W_Oᵀ (y_O − μ_O) / ε (W_O: the observed rows).
  A thin SVD W_O = U diag(σ) Vᵀ makes both diagonal without squaring W_O's
  condition number. The unobserved slices then follow
  y_U | y_O ~ N(μ_U + W_U m_z, W_U A⁻¹ W_Uᵀ + εI), which is the Schur complement
  Σ_UU − Σ_UO Σ_OO⁻¹ Σ_OU of Σ = WWᵀ + εI, computed with P×P algebra only.

  Returns:
    m_z: posterior mean of z, [L, P].
    root: a square root of A⁻¹ (root rootᵀ = A⁻¹), [L, P, P].
    mask: observed as float, [S].
  """
  mask = observed.astype(g.W.dtype)                            # [S]
  # Zeroing the unobserved rows keeps shapes static, so a traced mask works under jit.
  w_obs = g.W * mask[None, :, None]                            # [L, S, P]
  u, sig, vh = jnp.linalg.svd(w_obs, full_matrices=False)      # [L,S,K], [L,K], [L,K,P]
  r = (y_obs - g.mean) * mask[:, None]                         # [S, L]
  c = jnp.einsum("lsk,sl->lk", u, r)
  m_z = jnp.einsum("lkp,lk->lp", vh, c * sig / (jnp.square(sig) + eps))
  # A⁻¹ = I − V diag(σ²/(σ²+ε)) Vᵀ; its symmetric root shrinks span(V) by √(ε/(σ²+ε))
  # and leaves the directions W_O does not see at prior variance 1.
  shrink = jnp.sqrt(eps / (jnp.square(sig) + eps)) - 1.0       # [L, K]
  eye = jnp.eye(g.rank, dtype=g.W.dtype)
  root = eye + jnp.einsum("lkp,lk,lkq->lpq", vh, shrink, vh)
  return m_z, root, mask


def _check_condition_args(g: LatentGaussian, y_obs: Any, observed: Any) -> None:
  if tuple(np.shape(y_obs)) != (g.num_slices, g.latent_dim):
    raise ValueError(f"y_obs must be [S, L] = {(g.num_slices, g.latent_dim)}, "
                     f"got {tuple(np.shape(y_obs))}")
  if tuple(np.shape(observed)) != (g.num_slices,):
    raise ValueError(f"observed must be a boolean mask [S] = [{g.num_slices}], "
                     f"got shape {tuple(np.shape(observed))}")


@jax.jit
def _conditional_mean(g: LatentGaussian, y_obs: jax.Array, observed: jax.Array,
                      eps: jax.Array) -> jax.Array:
  m_z, _, _ = _condition(g, y_obs, observed, eps)
  return jnp.where(observed[:, None], y_obs, to_latent(g, m_z))


def conditional_mean(g: LatentGaussian, y_obs: jax.Array, observed: jax.Array,
                     eps: float = 1e-3) -> jax.Array:
  """E[y | y_O]: observed slices as given, the others μ_U + Σ_UO Σ_OO⁻¹ (y_O − μ_O).

  Σ = W_l W_lᵀ + eps·I per dimension (see `log_density` for why eps > 0).

  Args:
    g: the latent model.
    y_obs: [S, L]; only rows where `observed` is true are read.
    observed: bool [S], the given slices (may be traced under jit).
    eps: isotropic slice noise.

  Returns:
    [S, L]: rows of `observed` equal to y_obs, the rest the conditional mean.
  """
  _check_eps(eps)
  _check_condition_args(g, y_obs, observed)
  return _conditional_mean(g, jnp.asarray(y_obs, g.W.dtype), jnp.asarray(observed, bool),
                           jnp.asarray(eps, g.W.dtype))


@functools.partial(jax.jit, static_argnames=("num",))
def _conditional_sample(g: LatentGaussian, key: jax.Array, y_obs: jax.Array,
                        observed: jax.Array, num: int, eps: jax.Array) -> jax.Array:
  m_z, root, _ = _condition(g, y_obs, observed, eps)
  key_z, key_n = jax.random.split(key)
  xi = jax.random.normal(key_z, (num, g.latent_dim, g.rank), g.W.dtype)
  z = m_z + jnp.einsum("lpq,nlq->nlp", root, xi)               # z ~ N(m_z, A⁻¹)
  noise = jax.random.normal(key_n, (num, g.num_slices, g.latent_dim), g.W.dtype)
  y = to_latent(g, z) + jnp.sqrt(eps) * noise
  return jnp.where(observed[:, None], y_obs, y)


def conditional_sample(g: LatentGaussian, key: jax.Array, y_obs: jax.Array,
                       observed: jax.Array, num: int, eps: float = 1e-3) -> jax.Array:
  """Completes partially given stacks: draws y_U ~ p(y_U | y_O) exactly, [num, S, L].

  Per dimension, with Σ = W_l W_lᵀ + eps·I, the conditional is
  N(μ_U + Σ_UO Σ_OO⁻¹ (y_O − μ_O), Σ_UU − Σ_UO Σ_OO⁻¹ Σ_OU). It is sampled through
  the factors: z ~ p(z | y_O) (a P×P Gaussian, drawn with a symmetric root of its
  covariance), then y_U = W_U z + μ_U + √eps n_U; this has exactly the conditional's
  mean and covariance and never forms an S×S matrix. With nothing observed it is
  `sample` plus eps noise.

  Args:
    g: the latent model.
    key: PRNG key; the same key gives the same completions.
    y_obs: [S, L]; only rows where `observed` is true are read.
    observed: bool [S], the given slices (may be traced under jit).
    num: number of completions.
    eps: isotropic slice noise that makes Σ_OO invertible (> 0).

  Returns:
    [num, S, L]: observed rows equal to y_obs exactly, the rest drawn.
  """
  _check_eps(eps)
  _check_condition_args(g, y_obs, observed)
  return _conditional_sample(g, key, jnp.asarray(y_obs, g.W.dtype),
                             jnp.asarray(observed, bool), int(num),
                             jnp.asarray(eps, g.W.dtype))


# ----------------------------------------------------------------------------- persistence


def _json_default(obj: Any) -> Any:
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, "__array__"):                                # numpy and jax arrays
    return np.asarray(obj).tolist()
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save(path: str | os.PathLike, g: LatentGaussian, meta: dict[str, Any]) -> None:
  """Writes the model and `meta` to one .npz file, atomically.

  Arrays: mean [S, L], W [L, S, P], singular_values [L, K], num_train, and
  meta_json, a JSON string of `meta` (the caller's slice axis, grid, voxel size,
  affine, latent shape, bn_mode, checkpoint step, ...), so sampling needs neither
  the training data nor the encoder's inputs again. No pickles.
  """
  meta_json = json.dumps(meta, sort_keys=True, default=_json_default)
  fileio.save_npz(
      path,
      mean=np.asarray(g.mean),
      W=np.asarray(g.W),
      singular_values=np.asarray(g.singular_values),
      num_train=np.asarray(g.num_train, np.int64),
      meta_json=np.asarray(meta_json),
      format_version=np.asarray(FORMAT_VERSION, np.int64),
  )


def load(path: str | os.PathLike) -> tuple[LatentGaussian, dict[str, Any]]:
  """Reads a file written by `save`: (LatentGaussian with float32 arrays, meta).

  Raises:
    DataError: naming `path`, if it is missing, not a readable .npz, lacks a key,
      has inconsistent shapes or non-finite values.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(f"{path}: latent Gaussian file not found")
  try:
    with open(path, "rb") as f:
      raw = f.read()
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
      missing = [k for k in _ARRAY_KEYS if k not in npz.files]
      if missing:
        raise DataError(f"{path}: not a latent Gaussian file, missing keys {missing}")
      arrays = {k: npz[k] for k in _ARRAY_KEYS}
  except DataError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"{path}: cannot read latent Gaussian file ({e})") from e

  try:
    version = int(arrays["format_version"])
    num_train = int(arrays["num_train"])
  except (TypeError, ValueError) as e:
    raise DataError(f"{path}: corrupt format_version or num_train ({e})") from e
  if version != FORMAT_VERSION:
    raise DataError(f"{path}: format version {version}, this code reads {FORMAT_VERSION}")
  mean, w, sv = arrays["mean"], arrays["W"], arrays["singular_values"]
  if (mean.ndim != 2 or w.ndim != 3 or sv.ndim != 2 or w.shape[:2] != mean.shape[::-1]
      or sv.shape[0] != mean.shape[1] or w.shape[2] > sv.shape[1]):
    raise DataError(f"{path}: inconsistent shapes mean {mean.shape}, W {w.shape}, "
                    f"singular_values {sv.shape} (want [S, L], [L, S, P], [L, K>=P])")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(w)) and np.all(np.isfinite(sv))):
    raise DataError(f"{path}: non-finite values in the latent Gaussian")
  try:
    meta = json.loads(str(arrays["meta_json"]))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: corrupt metadata JSON ({e})") from e
  if not isinstance(meta, dict):
    raise DataError(f"{path}: metadata is {type(meta).__name__}, expected an object")
  g = LatentGaussian(mean=jnp.asarray(mean, jnp.float32), W=jnp.asarray(w, jnp.float32),
                     singular_values=jnp.asarray(sv, jnp.float32),
                     num_train=num_train)
  return g, meta
