"""Latent model (one cohesive module): stacks [N, S, L] -> low-rank Gaussian -> new stacks.

Kept whole although long: the three latent models share one factor algebra (fit,
sample, log density, conditionals) and one file format.

Sits between the encoder (which turns N training volumes into posterior means
Y [N, S, L], S slices, L latent entries per slice) and the vmapped decoder (which
turns sampled stacks [num, S, L] back into volumes). Config `latent.model` picks
one of three models. All are y = B z + μ with z ~ N(0, I), μ the mean over the
training volumes and B from a truncated SVD of the centred training stacks, so
that B Bᵀ is the (ddof=0) sample covariance cut to its top principal directions:

  per_dim   (paper §2.1, the default) p(y) = Π_l N(y_l | μ_l, W_l W_lᵀ), one Gaussian
            over the S slices of each latent entry l, y_l = [y_l(1), ..., y_l(S)],
            with W_l [S, P] from the SVD of the centred N×S matrix of entry l.
            Entries are independent: Cov(y_l, y_k) = 0 for l ≠ k.
  joint     (not in the paper) one Gaussian over the whole stack, D = S·L
            dimensions: Cov(vec y) = W Wᵀ, W [D, P] from the SVD of the centred
            N×D matrix. Every covariance between entries and slices is kept, but
            the centred data span at most N − 1 directions, so P ≤ min(rank, N − 1).
  rotated   (not in the paper) per_dim in a PCA basis of the latent channels:
            R [L, L] orthonormal, the eigenvectors (descending eigenvalue) of the
            channel scatter Σ_{n,s} (y[n,s] − μ[s])ᵀ(y[n,s] − μ[s]) pooled over all
            slices of all training volumes; per_dim is fitted to ỹ = y R and a
            draw maps back with y = ỹ Rᵀ.

Which to use. per_dim is the paper's model and the default: L·P factors, so with
N = 400 it still has 1024·64 directions of variation; its samples reproduce each
entry's correlations along the slices but treat the entries as independent, an
assumption the encoder's KL term (towards N(0, I) per slice) favours but does not
enforce. joint also models the correlations between entries (a whole-stack PCA
shape model) but has at most N − 1 directions, so its samples stay in the span of
the training stacks: coherent, less diverse; use it when per_dim's samples mix
incompatible features. rotated sits in between at per_dim's cost: it first
removes the correlations between entries of the same slice (e.g. between the
2×2 positions of one feature channel), then treats the rotated channels as
independent; it still leaves out the correlation between different rotated
channels at different slices. `log_density` is in the same units for all three,
so held-out stacks compare them directly, as do the sample metrics.

Implementation: every kind is the per_dim factor algebra applied to a view of
the stack, v = view(y − μ) [..., S', G] with G groups of S' rows each and factors
W [G, S', P]: per_dim is the identity (G = L, S' = S); rotated is v = (y − μ) R
(G = L, S' = S); joint is the reshape to one column of D rows (G = 1, S' = S·L,
row s·L + l). All three views are orthonormal maps, so densities need no
Jacobian, isotropic noise stays isotropic, and row s of y (a slice) becomes view
row s (per_dim, rotated) or view rows s·L..s·L+L−1 (joint): conditioning on
observed slices is conditioning on those view rows. Log densities and conditionals (some slices given, the rest
drawn) are closed form and use the proper covariance Σ + eps·I, see
`log_density`. Nothing forms or inverts an S'×S' matrix; `covariance` forms the
S×S ones it returns.
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

from slicevae_jax import config_lib
from slicevae_jax import fileio
from slicevae_jax.errors import DataError

MODELS = config_lib.LATENT_MODELS   # ('per_dim', 'joint', 'rotated')

# Bump when the .npz layout changes; `load` refuses versions it does not know.
# 1: per_dim only (no 'model' entry). 2: adds 'model', and 'rotation' for rotated.
FORMAT_VERSION = 2
_ARRAY_KEYS = ("mean", "W", "singular_values", "num_train", "meta_json", "format_version")


@flax.struct.dataclass
class LatentGaussian:
  """The fitted latent model: y = B z + μ, z ~ N(0, I) (see the module docstring).

  Attributes:
    mean: μ, [S, L] float32, in the stack's own coordinates for every kind.
    W: [G, S', P] float32, the factors of each group of the view (per_dim, rotated:
      [L, S, P], group l = latent entry or rotated channel l; joint: [1, S·L, P],
      row s·L + l). W_g = V_g[:, :P] diag(s_g[:P]) / √N, so W_g W_gᵀ is the sample
      covariance of that group of the view truncated to its top-P principal
      subspace; its columns are orthogonal (W_gᵀ W_g = diag(s_g[:P]²) / N).
    singular_values: [G, K]: all singular values s_g of the centred data of each
      group in decreasing order (K = min(N, S'); kept beyond P for
      `explained_variance`).
    num_train: N, the number of training volumes (static, not a pytree leaf).
    kind: 'per_dim' | 'joint' | 'rotated' (static, so jit specialises on it).
    rotation: R [L, L] float32 with orthonormal columns for 'rotated', else None.
  """

  mean: jax.Array
  W: jax.Array
  singular_values: jax.Array
  num_train: int = flax.struct.field(pytree_node=False)
  kind: str = flax.struct.field(pytree_node=False, default="per_dim")
  rotation: jax.Array | None = None

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
    """P, the number of factors per group (columns of each W_g)."""
    return int(self.W.shape[-1])

  @property
  def factor_shape(self) -> tuple[int, int]:
    """(G, P): the shape of the factors z of one stack (see `to_latent`)."""
    return (int(self.W.shape[0]), self.rank)


def _layout(kind: str, num_slices: int, latent_dim: int) -> tuple[int, int]:
  """(G, S'): groups and rows per group of the view of an [S, L] stack."""
  if kind == "joint":
    return 1, num_slices * latent_dim
  return latent_dim, num_slices


def _view(g: LatentGaussian, r: jax.Array) -> jax.Array:
  """Centred stacks in the coordinates the factors live in: [..., S, L] -> [..., S', G]."""
  if g.kind == "rotated":
    return jnp.einsum("...sl,lk->...sk", r, g.rotation)
  if g.kind == "joint":
    return r.reshape(r.shape[:-2] + (-1, 1))
  return r


def _unview(g: LatentGaussian, v: jax.Array) -> jax.Array:
  """The inverse of `_view`: [..., S', G] -> [..., S, L]."""
  if g.kind == "rotated":
    return jnp.einsum("...sk,lk->...sl", v, g.rotation)
  if g.kind == "joint":
    return v.reshape(v.shape[:-2] + (g.num_slices, g.latent_dim))
  return v


def _view_mask(g: LatentGaussian, observed: jax.Array) -> jax.Array:
  """Which view rows a slice mask [S] observes: [S']."""
  if g.kind == "joint":
    return jnp.repeat(observed, g.latent_dim)                  # row s·L + l is slice s
  return observed


# ----------------------------------------------------------------------------- fit


def _group_factors(x: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """W [G, S', P] and s [G, K] from centred data laid out as [G, N, S'] (one batched SVD)."""
  n = x.shape[1]
  _, s, vh = jnp.linalg.svd(x, full_matrices=False)            # s [G, K], vh [G, K, S']
  p = min(rank, s.shape[-1])
  # X_gᵀX_g / N = V diag(s²/N) Vᵀ, so V[:, :P] diag(s[:P]) / √N is its rank-P square root.
  w = jnp.swapaxes(vh[:, :p, :], 1, 2) * (s[:, None, :p] / math.sqrt(n))
  return w, s


@functools.partial(jax.jit, static_argnames=("rank", "kind"))
def _fit_slices(y: jax.Array, rank: int, kind: str) -> LatentGaussian:
  """per_dim and rotated: one batched SVD over the L groups of [N, S]."""
  n = y.shape[0]
  mean = jnp.mean(y, axis=0)                                   # [S, L]
  x = y - mean
  rotation = None
  if kind == "rotated":
    scatter = jnp.einsum("nsl,nsk->lk", x, x)                  # pooled over volumes and slices
    _, vecs = jnp.linalg.eigh(scatter)                         # ascending eigenvalues
    rotation = vecs[:, ::-1]
    x = jnp.einsum("nsl,lk->kns", x, rotation)                 # [L, N, S], rotated channels
  else:
    x = jnp.transpose(x, (2, 0, 1))                            # [L, N, S]
  w, s = _group_factors(x, rank)
  return LatentGaussian(mean=mean, W=w, singular_values=s, num_train=n, kind=kind,
                        rotation=rotation)


# Elements of the [N, D] data the joint fit centres in float64 at once: column chunks of
# 64 MB instead of a float64 copy of the whole matrix (0.8 GB at 256³).
_GRAM_ELEMENTS = 1 << 23


def _fit_joint(y: np.ndarray, rank: int, dtype: Any) -> LatentGaussian:
  """joint: the SVD of the centred N×D matrix through its smaller Gram matrix, in float64.

  For D > N the N×N Gram matrix X Xᵀ = U diag(s²) Uᵀ is accumulated over column
  chunks and W = Xᵀ U[:, :P] / √N (= V[:, :P] diag(s[:P]) / √N, no division by
  small s). float64 keeps the small directions that a float32 Gram matrix, whose
  rounding error is relative to s_max², would lose. At 256³ (X 400×262144) this
  took 8–12 s and 0.9 GiB peak with the input, where `jnp.linalg.svd` of X took
  99 s and 1.9 GiB on the same 2-core CPU. For D ≤ N the thin float64 SVD of X
  is as cheap.
  """
  n = y.shape[0]
  x = y.reshape(n, -1)                                         # [N, D], a view of y
  d = x.shape[1]
  mean = np.mean(x, axis=0, dtype=np.float64)                  # [D]
  p = min(rank, n - 1, d)
  if d <= n:
    _, s, vh = np.linalg.svd(x - mean, full_matrices=False)
    w = vh[:p].T * (s[:p] / math.sqrt(n))
  else:
    step = max(1, _GRAM_ELEMENTS // n)
    cols = [slice(j, j + step) for j in range(0, d, step)]
    gram = np.zeros((n, n))
    for c in cols:
      xc = x[:, c] - mean[c]
      gram += xc @ xc.T
    lam, u = np.linalg.eigh(gram)
    lam, u = lam[::-1], u[:, ::-1][:, :p]                      # descending
    s = np.sqrt(np.maximum(lam, 0.0))
    w = np.empty((d, p))
    for c in cols:
      w[c] = (x[:, c] - mean[c]).T @ u
    w /= math.sqrt(n)
  return LatentGaussian(mean=jnp.asarray(mean.reshape(y.shape[1:]), dtype),
                        W=jnp.asarray(w[None], dtype), singular_values=jnp.asarray(s[None], dtype),
                        num_train=n, kind="joint")


def fit(y: jax.Array | np.ndarray, rank: int, dtype: Any = jnp.float32,
        model: str = "per_dim") -> LatentGaussian:
  """Fits μ and the factors W of latent model `model` from encoded training stacks.

  per_dim (paper §2.1): for each l, μ_l = (1/N) Σ_n y_l^(n), X_l = Y_l − μ_l (N×S),
  X_l = U diag(s) Vᵀ, W_l = V[:, :P] diag(s[:P]) / √N, hence W_l W_lᵀ = X_lᵀ X_l / N
  when P = min(N, S) (the ddof=0 sample covariance Σ_l) and its best rank-P
  approximation otherwise. All L SVDs are one `jnp.linalg.svd` on [L, N, S].
  rotated: the same on the rotated channels (y − μ) R, R from `jnp.linalg.eigh` of
  the pooled L×L channel scatter. joint: the same with one group of D = S·L rows,
  computed on the host in float64 (see `_fit_joint`).

  The effective rank is P = min(rank, N, S) for per_dim and rotated (the centred
  data has at most min(N, S) non-zero singular values per group, min(N − 1, S) in
  fact, the last one being ~0, so more columns would only add zeros), and
  P = min(rank, N − 1, S·L) for joint, where a column for the zero direction
  would be noise.

  Memory at 256³ (N = 400, S = 256, L = 1024; measured peak host RSS with the
  0.4 GB float32 input, bench/RESULTS.md): per_dim 2.1 GiB (the SVD holds X and
  U, each N·S·L floats), rotated 2.2 GiB (the same SVD on the rotated X), joint
  0.9 GiB (float64 chunks of X, the N×N Gram matrix and W). per_dim and rotated
  compute in `dtype` (float32 unless x64 is enabled and float64 asked for);
  joint always computes in float64 and stores in `dtype`.

  Args:
    y: posterior means of the training stacks, [N, S, L].
    rank: requested number of factors per group (>= 1).
    dtype: compute and storage dtype.
    model: 'per_dim' | 'joint' | 'rotated'.

  Returns:
    The fitted `LatentGaussian`. per_dim and rotated are jit-friendly (`rank` and
    `model` static, shapes from y); joint reads y on the host, so it cannot be
    traced.
  """
  if model not in MODELS:
    raise ValueError(f"unknown latent model {model!r}; choose one of {list(MODELS)}")
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got {rank}")
  if y.ndim != 3:
    raise ValueError(f"expected encoded stacks [N, S, L], got shape {tuple(y.shape)}")
  if y.shape[0] < 2:
    raise ValueError(f"need at least 2 volumes to estimate a covariance, got {y.shape[0]}")
  if model != "joint":
    return _fit_slices(jnp.asarray(y, dtype), int(rank), model)
  try:
    host = np.asarray(y)
  except jax.errors.TracerArrayConversionError as e:
    raise ValueError("model='joint' fits on the host in float64 and cannot be traced "
                     "under jit; call lg.fit outside jit") from e
  return _fit_joint(host, int(rank), dtype)


def explained_variance(g: LatentGaussian) -> jax.Array:
  """Fraction of each group's total variance that rank P keeps, [G] (G = L, or 1 for joint).

  Σ_{p<P} s_p² / Σ_k s_k², i.e. tr(W_g W_gᵀ) / tr(X_gᵀX_g / N). A group whose
  training codes are constant (zero variance) counts as fully explained.
  """
  s2 = jnp.square(g.singular_values)
  total = jnp.sum(s2, axis=-1)
  kept = jnp.sum(s2[:, :g.rank], axis=-1)
  return jnp.where(total > 0, kept / jnp.where(total > 0, total, 1.0), 1.0)


# ----------------------------------------------------------------------------- sampling


@jax.jit
def to_latent(g: LatentGaussian, z: jax.Array) -> jax.Array:
  """Maps factors to latent stacks: y = view⁻¹(W z) + μ (paper §2.1 for per_dim).

  Interpolating or editing in z (e.g. along a straight line between two draws)
  and mapping through here stays inside the model's support.

  Args:
    g: the latent model.
    z: [..., G, P] (`g.factor_shape`): [..., L, P] for per_dim and rotated,
      [..., 1, P] for joint.

  Returns:
    y: [..., S, L].
  """
  return _unview(g, jnp.einsum("lsp,...lp->...sl", g.W, z)) + g.mean


@jax.jit
def from_latent(g: LatentGaussian, y: jax.Array) -> jax.Array:
  """Least-squares factors of latent stacks: z_g = W_g⁺ view(y − μ)_g, [..., S, L] -> [..., G, P].

  The inverse of `to_latent` on the model's support (for y = to_latent(g, z) it
  returns z exactly when each W_g has full column rank); elsewhere it drops the
  part outside span(W_g). Factors with zero singular value map to 0.
  """
  u, s, vh = jnp.linalg.svd(g.W, full_matrices=False)          # u [G,S',K], s [G,K], vh [G,K,P]
  c = jnp.einsum("lsk,...sl->...lk", u, _view(g, y - g.mean))
  inv = jnp.where(s > _tiny(s), 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  return jnp.einsum("lkp,...lk->...lp", vh, c * inv)


@functools.partial(jax.jit, static_argnames=("num",))
def sample(g: LatentGaussian, key: jax.Array, num: int) -> jax.Array:
  """Draws new latent stacks: z ~ N(0, I) of shape [num, G, P], y = `to_latent`(z), [num, S, L].

  The same key gives the same stacks. Decode slice by slice to get volumes.
  """
  z = jax.random.normal(key, (num,) + g.factor_shape, g.W.dtype)
  return to_latent(g, z)


def covariance(g: LatentGaussian, l: int | None = None) -> jax.Array:
  """Cov(y_l), the slice covariance of latent entry l: [S, S], or [L, S, S] for every l.

  The model's marginal over the S slices of one entry, in the stack's own
  coordinates, without eps: per_dim W_l W_lᵀ; rotated Σ_k R[l,k]² W_k W_kᵀ
  (y_l = Σ_k R[l,k] ỹ_k with independent rotated channels ỹ_k); joint the
  (l, l) block of W Wᵀ. The covariance between different entries is zero for
  per_dim and not returned here for the others (compose it from W and R).
  """
  if g.kind == "joint":
    w = g.W[0].reshape(g.num_slices, g.latent_dim, g.rank)     # row s·L + l -> [s, l]
    if l is None:
      return jnp.einsum("slp,tlp->lst", w, w)
    return w[:, l] @ w[:, l].T
  per_group = jnp.einsum("lsp,ltp->lst", g.W, g.W)
  if g.kind == "rotated":
    weights = jnp.square(g.rotation)                           # [entry, rotated channel]
    if l is None:
      return jnp.einsum("lk,kst->lst", weights, per_group)
    return jnp.einsum("k,kst->st", weights[l], per_group)
  return per_group if l is None else per_group[l]


# ----------------------------------------------------------------------------- density


def _tiny(s: jax.Array) -> jax.Array:
  """Relative cut-off below which a singular value counts as zero, [..., 1]."""
  return jnp.max(s, axis=-1, keepdims=True) * s.shape[-1] * jnp.finfo(s.dtype).eps


def _check_eps(eps: Any) -> None:
  if isinstance(eps, (int, float)) and not eps > 0:
    raise ValueError(f"eps must be > 0 to make the covariance proper, got {eps}")


@jax.jit
def _log_density(g: LatentGaussian, y: jax.Array, eps: jax.Array) -> jax.Array:
  # Per group of the view; both views are orthonormal (|det| = 1), so the view's
  # density is the stack's density.
  r = _view(g, y - g.mean)                                     # [..., S', G]
  rows = r.shape[-2]
  # Thin SVD W_g = Q diag(σ) Rᵀ diagonalises the P×P capacitance matrix
  # εI + W_gᵀW_g = R diag(σ² + ε) Rᵀ of Woodbury's identity, so both the quadratic
  # form and the determinant come from K = min(S', P) numbers per group.
  q, sig, _ = jnp.linalg.svd(g.W, full_matrices=False)         # q [G, S', K], sig [G, K]
  lam = jnp.square(sig) + eps                                  # eigenvalues in span(W_g)
  c = jnp.einsum("lsk,...sl->...lk", q, r)                     # coordinates in span(W_g)
  # The residual outside span(W_g) is formed explicitly rather than as |r|² − |c|²,
  # which would cancel catastrophically in float32 when divided by a small ε.
  perp = r - jnp.einsum("lsk,...lk->...sl", q, c)
  quad = jnp.sum(jnp.square(c) / lam, axis=-1) + jnp.sum(jnp.square(perp), axis=-2) / eps
  # Matrix determinant lemma: log|W Wᵀ + εI| = log|εI_K + diag(σ²)| + (S' − K) log ε.
  logdet = jnp.sum(jnp.log(lam), axis=-1) + (rows - q.shape[-1]) * jnp.log(eps)
  per_group = -0.5 * (quad + logdet + rows * math.log(2 * math.pi))   # [..., G]
  return jnp.sum(per_group, axis=-1)


def log_density(g: LatentGaussian, y: jax.Array, eps: float = 1e-3) -> jax.Array:
  """log p(y) under N(μ, B Bᵀ + eps·I) over the whole stack, for y [..., S, L] -> [...].

  per_dim: Σ_l log N(y_l | μ_l, W_l W_lᵀ + eps·I); rotated: the same for the
  rotated channels (no Jacobian: R is orthonormal); joint: one D-dimensional term.
  B Bᵀ has rank ≤ P per group, so for P < S' the fitted Gaussian is degenerate
  (no density off its subspace); eps > 0 adds isotropic noise that makes it a
  proper density. With the inverse via Woodbury,
  (WWᵀ + εI)⁻¹ = ε⁻¹(I − W(εI_P + WᵀW)⁻¹Wᵀ), and the determinant via the matrix
  determinant lemma, the cost is O(S'·P) per group after an O(S'·P²)
  factorisation; no S'×S' matrix is formed. Densities are in the units of y
  (nats per stack), comparable between kinds.
  """
  _check_eps(eps)
  return _log_density(g, jnp.asarray(y, g.W.dtype), jnp.asarray(eps, g.W.dtype))


# ----------------------------------------------------------------------------- conditioning


@jax.jit
def _condition(g: LatentGaussian, y_obs: jax.Array, observed: jax.Array, eps: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """Posterior of the factors z_g given the observed slices, for every group g.

  Writes v_g = W_g z_g + √ε n_g (v the centred view) with z_g ~ N(0, I_P),
  n_g ~ N(0, I_S'), which has exactly the covariance W_g W_gᵀ + εI. Given the
  observed view rows v_O, z_g has precision A = I + W_Oᵀ W_O / ε and mean
  A⁻¹ W_Oᵀ v_O / ε (W_O: the observed rows). A thin SVD W_O = U diag(σ) Vᵀ makes
  both diagonal without squaring W_O's condition number. The unobserved rows then
  follow v_U | v_O ~ N(W_U m_z, W_U A⁻¹ W_Uᵀ + εI), which is the Schur complement
  Σ_UU − Σ_UO Σ_OO⁻¹ Σ_OU of Σ = WWᵀ + εI, computed with P×P algebra only.

  Returns:
    m_z: posterior mean of z, [G, P].
    root: a square root of A⁻¹ (root rootᵀ = A⁻¹), [G, P, P].
  """
  mask = _view_mask(g, observed).astype(g.W.dtype)             # [S']
  # Zeroing the unobserved rows keeps shapes static, so a traced mask works under
  # jit, and whatever those rows of y_obs hold (even NaN) is never read.
  r = _view(g, jnp.where(observed[:, None], y_obs - g.mean, 0.0))     # [S', G]
  w_obs = g.W * mask[None, :, None]                            # [G, S', P]
  u, sig, vh = jnp.linalg.svd(w_obs, full_matrices=False)      # [G,S',K], [G,K], [G,K,P]
  c = jnp.einsum("lsk,sl->lk", u, r)
  m_z = jnp.einsum("lkp,lk->lp", vh, c * sig / (jnp.square(sig) + eps))
  # A⁻¹ = I − V diag(σ²/(σ²+ε)) Vᵀ; its symmetric root shrinks span(V) by √(ε/(σ²+ε))
  # and leaves the directions W_O does not see at prior variance 1.
  shrink = jnp.sqrt(eps / (jnp.square(sig) + eps)) - 1.0       # [G, K]
  eye = jnp.eye(g.rank, dtype=g.W.dtype)
  root = eye + jnp.einsum("lkp,lk,lkq->lpq", vh, shrink, vh)
  return m_z, root


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
  m_z, _ = _condition(g, y_obs, observed, eps)
  return jnp.where(observed[:, None], y_obs, to_latent(g, m_z))


def conditional_mean(g: LatentGaussian, y_obs: jax.Array, observed: jax.Array,
                     eps: float = 1e-3) -> jax.Array:
  """E[y | y_O]: observed slices as given, the others μ_U + Σ_UO Σ_OO⁻¹ (y_O − μ_O).

  Σ = B Bᵀ + eps·I over the whole stack (see `log_density` for why eps > 0); for
  per_dim and rotated it is block diagonal over (rotated) entries, so each is
  conditioned on its own observed slices only.

  Args:
    g: the latent model.
    y_obs: [S, L]; only rows where `observed` is true are read.
    observed: bool [S], the given slices (may be traced under jit).
    eps: isotropic noise.

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
  m_z, root = _condition(g, y_obs, observed, eps)
  key_z, key_n = jax.random.split(key)
  xi = jax.random.normal(key_z, (num,) + g.factor_shape, g.W.dtype)
  z = m_z + jnp.einsum("lpq,nlq->nlp", root, xi)               # z ~ N(m_z, A⁻¹)
  # Isotropic noise drawn in the stack's coordinates is isotropic in the
  # (orthonormal) view too, so it is the model's √ε n.
  noise = jax.random.normal(key_n, (num, g.num_slices, g.latent_dim), g.W.dtype)
  y = to_latent(g, z) + jnp.sqrt(eps) * noise
  return jnp.where(observed[:, None], y_obs, y)


def conditional_sample(g: LatentGaussian, key: jax.Array, y_obs: jax.Array,
                       observed: jax.Array, num: int, eps: float = 1e-3) -> jax.Array:
  """Completes partially given stacks: draws y_U ~ p(y_U | y_O) exactly, [num, S, L].

  With Σ = B Bᵀ + eps·I, the conditional is
  N(μ_U + Σ_UO Σ_OO⁻¹ (y_O − μ_O), Σ_UU − Σ_UO Σ_OO⁻¹ Σ_OU). It is sampled through
  the factors: z ~ p(z | y_O) (a P×P Gaussian per group, drawn with a symmetric
  root of its covariance), then y = `to_latent`(z) + √eps n on the unobserved
  rows; this has exactly the conditional's mean and covariance and never forms
  an S'×S' matrix. With nothing observed it is `sample` plus eps noise.

  Args:
    g: the latent model.
    key: PRNG key; the same key gives the same completions.
    y_obs: [S, L]; only rows where `observed` is true are read.
    observed: bool [S], the given slices (may be traced under jit).
    num: number of completions.
    eps: isotropic noise that makes Σ_OO invertible (> 0).

  Returns:
    [num, S, L]: observed rows equal to y_obs exactly, the rest drawn.
  """
  _check_eps(eps)
  _check_condition_args(g, y_obs, observed)
  return _conditional_sample(g, key, jnp.asarray(y_obs, g.W.dtype),
                             jnp.asarray(observed, bool), int(num),
                             jnp.asarray(eps, g.W.dtype))


# ----------------------------------------------------------------------------- persistence


def save(path: str | os.PathLike, g: LatentGaussian, meta: dict[str, Any]) -> None:
  """Writes the model and `meta` to one .npz file (format version 2), atomically.

  Arrays: mean [S, L], W [G, S', P], singular_values [G, K], num_train, model (the
  kind as a string), rotation [L, L] (rotated only), format_version, and
  meta_json, a JSON string of `meta` (the caller's slice axis, grid, voxel size,
  affine, latent shape, bn_mode, checkpoint step, ...), so sampling needs neither
  the training data nor the encoder's inputs again. No pickles.
  """
  meta_json = json.dumps(meta, sort_keys=True, default=fileio.json_default)
  extra = {} if g.rotation is None else {"rotation": np.asarray(g.rotation)}
  fileio.save_npz(
      path,
      mean=np.asarray(g.mean),
      W=np.asarray(g.W),
      singular_values=np.asarray(g.singular_values),
      num_train=np.asarray(g.num_train, np.int64),
      model=np.asarray(g.kind),
      meta_json=np.asarray(meta_json),
      format_version=np.asarray(FORMAT_VERSION, np.int64),
      **extra,
  )


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of a latent Gaussian file, DataError if unreadable or missing a v1 key."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
      missing = [k for k in _ARRAY_KEYS if k not in npz.files]
      if missing:
        raise DataError(f"{path}: not a latent Gaussian file, missing keys {missing}")
      return {k: npz[k] for k in npz.files}
  except DataError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"{path}: cannot read latent Gaussian file ({e})") from e


def _kind_of(path: str, arrays: dict[str, np.ndarray], version: int) -> str:
  """The model kind a file of `version` holds: version 1 files are per_dim."""
  if version == 1:
    return "per_dim"
  if version != FORMAT_VERSION:
    raise DataError(f"{path}: format version {version}; this code reads 1 and {FORMAT_VERSION}")
  if "model" not in arrays:
    raise DataError(f"{path}: format version {version} without its 'model' entry")
  kind = str(arrays["model"])
  if kind not in MODELS:
    raise DataError(f"{path}: unknown latent model {kind!r}; this code reads {list(MODELS)}")
  if kind == "rotated" and "rotation" not in arrays:
    raise DataError(f"{path}: a rotated latent model without its 'rotation' entry")
  return kind


def load(path: str | os.PathLike) -> tuple[LatentGaussian, dict[str, Any]]:
  """Reads a file written by `save`: (LatentGaussian with float32 arrays, meta).

  Reads format versions 1 (per_dim, before `latent.model` existed) and 2.

  Raises:
    DataError: naming `path`, if it is missing, not a readable .npz, lacks a key,
      has an unknown version or model, inconsistent shapes, non-finite values or
      a rotation that is not orthonormal.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DataError(f"{path}: latent Gaussian file not found")
  arrays = _read_npz(path)
  try:
    version = int(arrays["format_version"])
    num_train = int(arrays["num_train"])
  except (TypeError, ValueError) as e:
    raise DataError(f"{path}: corrupt format_version or num_train ({e})") from e
  kind = _kind_of(path, arrays, version)
  mean, w, sv = arrays["mean"], arrays["W"], arrays["singular_values"]
  rotation = arrays.get("rotation") if kind == "rotated" else None
  groups, rows = _layout(kind, *mean.shape) if mean.ndim == 2 else (-1, -1)
  if (mean.ndim != 2 or w.ndim != 3 or sv.ndim != 2 or w.shape[:2] != (groups, rows)
      or sv.shape[0] != groups or w.shape[2] > sv.shape[1]):
    raise DataError(f"{path}: inconsistent shapes mean {mean.shape}, W {w.shape}, "
                    f"singular_values {sv.shape} for a {kind} model (want [S, L], "
                    f"[G, S', P], [G, K>=P] with (G, S') = "
                    f"{'(1, S·L)' if kind == 'joint' else '(L, S)'})")
  checked = [mean, w, sv]
  if rotation is not None:
    if rotation.shape != (mean.shape[1],) * 2:
      raise DataError(f"{path}: rotation {rotation.shape}, want [L, L] = "
                      f"{(mean.shape[1],) * 2}")
    checked.append(rotation)
  if not all(np.all(np.isfinite(a)) for a in checked):
    raise DataError(f"{path}: non-finite values in the latent Gaussian")
  # Densities skip the Jacobian of the rotation, which is right only if R is orthonormal.
  if rotation is not None and np.max(np.abs(rotation.T @ rotation - np.eye(len(rotation)))) > 1e-3:
    raise DataError(f"{path}: rotation is not orthonormal")
  try:
    meta = json.loads(str(arrays["meta_json"]))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: corrupt metadata JSON ({e})") from e
  if not isinstance(meta, dict):
    raise DataError(f"{path}: metadata is {type(meta).__name__}, expected an object")
  as32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
  g = LatentGaussian(mean=as32(mean), W=as32(w), singular_values=as32(sv),
                     num_train=num_train, kind=kind, rotation=as32(rotation))
  return g, meta
