"""Latent Gaussian over the slice direction (paper §2.1): fit, sample, density, conditionals, files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from slicevae_jax.slicevae import latent as lg
from slicevae_jax.errors import DataError


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _known_model(rng, s, l, scales):
  """Per-dimension truth: mean [S, L], factors A [L, S, r] with orthogonal columns."""
  mu = rng.normal(size=(s, l)) * 2.0
  a = []
  for i in range(l):
    q, _ = np.linalg.qr(rng.normal(size=(s, len(scales))))
    a.append(q * np.asarray(scales) * (1.0 + 0.5 * i))   # a different covariance per l
  return mu, np.stack(a)


def _draw(rng, mu, a, n):
  z = rng.normal(size=(n, a.shape[0], a.shape[2]))
  return np.einsum("lsr,nlr->nsl", a, z) + mu             # [N, S, L]


def _sample_cov(y):
  """ddof=0 covariance over volumes for each l, float64: [L, S, S]."""
  x = y - y.mean(axis=0)
  return np.einsum("nsl,ntl->lst", x, x) / y.shape[0]


def test_fit_recovers_known_low_rank_covariance():
  rng = np.random.default_rng(0)
  s, l, n = 10, 4, 4000
  mu, a = _known_model(rng, s, l, scales=[3.0, 2.0, 1.0])   # rank 3 < S
  y = _draw(rng, mu, a, n)
  g = lg.fit(y, rank=3)
  assert (g.num_slices, g.latent_dim, g.rank, g.num_train) == (s, l, 3, n)
  assert g.mean.dtype == g.W.dtype == jnp.float32
  truth = np.einsum("lsr,ltr->lst", a, a)
  cov = np.asarray(lg.covariance(g))
  assert np.max(np.abs(np.asarray(g.mean) - mu)) < 0.2
  for i in range(l):
    assert _rel(cov[i], truth[i]) < 0.08, i
    np.testing.assert_allclose(lg.covariance(g, i), cov[i], rtol=1e-6, atol=1e-6)
  # All the variance lies in 3 directions, so rank 3 explains it.
  np.testing.assert_allclose(lg.explained_variance(g), 1.0, atol=1e-4)

  # Rank 2 keeps the top-2 principal subspace (eigenvalues 9, 4, 1 times a scale).
  g2 = lg.fit(y, rank=2)
  assert g2.rank == 2
  for i in range(l):
    w = np.asarray(g2.W[i], np.float64)
    proj = w @ np.linalg.pinv(w)
    top = a[i][:, :2] / np.linalg.norm(a[i][:, :2], axis=0)
    assert np.linalg.norm(proj - top @ top.T) < 0.1, i
  ev = np.asarray(lg.explained_variance(g2))
  np.testing.assert_allclose(ev, 13.0 / 14.0, atol=0.02)


def test_rank_is_capped_by_volumes_and_slices():
  y = np.random.default_rng(1).normal(size=(5, 8, 3))
  assert lg.fit(y, rank=100).rank == 5
  assert lg.fit(y.transpose(1, 0, 2), rank=100).rank == 5
  with pytest.raises(ValueError):
    lg.fit(y, rank=0)
  with pytest.raises(ValueError):
    lg.fit(y[0], rank=2)


@pytest.mark.parametrize("n,s", [(5, 8), (20, 6)])
def test_full_rank_w_wt_is_the_sample_covariance(n, s):
  y = np.random.default_rng(n).normal(size=(n, s, 3)) * np.linspace(0.5, 2.0, s)[:, None]
  g = lg.fit(y, rank=max(n, s))
  assert g.rank == min(n, s)
  ref = _sample_cov(y)
  np.testing.assert_allclose(g.mean, y.mean(axis=0), atol=1e-5)
  for i in range(3):
    np.testing.assert_allclose(lg.covariance(g, i), ref[i], atol=1e-5 * np.abs(ref[i]).max())
  # Truncation gives the best rank-P approximation of that same covariance.
  g3 = lg.fit(y, rank=3)
  for i in range(3):
    vals, vecs = np.linalg.eigh(ref[i])
    best = (vecs[:, -3:] * vals[-3:]) @ vecs[:, -3:].T
    np.testing.assert_allclose(lg.covariance(g3, i), best, atol=1e-5 * np.abs(ref[i]).max())


def test_fit_under_jit_matches_eager():
  y = jnp.asarray(np.random.default_rng(2).normal(size=(12, 6, 5)), jnp.float32)
  w = jax.jit(lambda y: lg.fit(y, 4).W)(y)
  np.testing.assert_allclose(w, lg.fit(y, 4).W, rtol=1e-5, atol=1e-6)


def _fitted(seed=3, s=6, l=3, n=200, rank=3):
  rng = np.random.default_rng(seed)
  mu, a = _known_model(rng, s, l, scales=[2.0, 1.0, 0.5, 0.25][:rank + 1])
  return lg.fit(_draw(rng, mu, a, n), rank=rank)


def test_samples_reproduce_fitted_statistics():
  g = _fitted()
  y = np.asarray(lg.sample(g, jax.random.key(0), 40000), np.float64)
  assert y.shape == (40000, g.num_slices, g.latent_dim)
  cov = np.asarray(lg.covariance(g))
  np.testing.assert_allclose(y.mean(axis=0), g.mean, atol=0.05)
  emp = _sample_cov(y)
  for i in range(g.latent_dim):
    assert _rel(emp[i], cov[i]) < 0.03, i


def test_same_key_same_samples():
  g = _fitted()
  a = lg.sample(g, jax.random.key(7), 3)
  b = lg.sample(g, jax.random.key(7), 3)
  c = lg.sample(g, jax.random.key(8), 3)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert not np.allclose(a[0], a[1])


def test_to_latent_and_from_latent():
  g = _fitted()
  z = jax.random.normal(jax.random.key(1), (4, g.latent_dim, g.rank))
  y = lg.to_latent(g, z)
  np.testing.assert_allclose(lg.from_latent(g, y), z, atol=1e-4)
  # Straight lines in z map to straight lines in y.
  mid = lg.to_latent(g, 0.5 * (z[0] + z[1]))
  np.testing.assert_allclose(mid, 0.5 * (y[0] + y[1]), atol=1e-5)


@pytest.mark.parametrize("rank,eps", [(3, 1e-3), (6, 1e-2), (2, 1e-1)])
def test_log_density_matches_scipy(rank, eps):
  g = _fitted(rank=rank)
  key_y, key_n = jax.random.split(jax.random.key(4))
  y = lg.sample(g, key_y, 5) + 0.3 * jax.random.normal(key_n, (5, g.num_slices, g.latent_dim))
  y = y.reshape(5, 1, g.num_slices, g.latent_dim)             # batch dims are kept
  got = np.asarray(lg.log_density(g, y, eps=eps))
  assert got.shape == (5, 1)
  w = np.asarray(g.W, np.float64)
  mu = np.asarray(g.mean, np.float64)
  y64 = np.asarray(y, np.float64)[:, 0]
  want = np.zeros(5)
  for i in range(g.latent_dim):
    cov = w[i] @ w[i].T + eps * np.eye(g.num_slices)
    want += stats.multivariate_normal(mu[:, i], cov).logpdf(y64[:, :, i])
  np.testing.assert_allclose(got[:, 0], want, rtol=2e-4, atol=2e-3)
  with pytest.raises(ValueError):
    lg.log_density(g, y, eps=0.0)


def _numpy_conditional(g, y_obs, observed, eps):
  w = np.asarray(g.W, np.float64)
  mu = np.asarray(g.mean, np.float64)
  o, u = observed, ~observed
  means, covs = [], []
  for i in range(g.latent_dim):
    sig = w[i] @ w[i].T + eps * np.eye(g.num_slices)
    gain = sig[np.ix_(u, o)] @ np.linalg.inv(sig[np.ix_(o, o)])
    means.append(mu[u, i] + gain @ (y_obs[o, i] - mu[o, i]))
    covs.append(sig[np.ix_(u, u)] - gain @ sig[np.ix_(o, u)])
  return np.stack(means, -1), np.stack(covs)                   # [U, L], [L, U, U]


def test_conditional_sample_matches_closed_form():
  g = _fitted(s=7, rank=4)
  eps = 1e-2
  observed = np.array([True, False, True, False, False, True, False])
  y_obs = np.asarray(lg.sample(g, jax.random.key(5), 1)[0])
  want_mean, want_cov = _numpy_conditional(g, np.asarray(y_obs, np.float64), observed, eps)

  mean = np.asarray(lg.conditional_mean(g, y_obs, observed, eps=eps))
  np.testing.assert_array_equal(mean[observed], y_obs[observed])
  np.testing.assert_allclose(mean[~observed], want_mean, rtol=1e-4, atol=1e-4)

  ys = np.asarray(lg.conditional_sample(g, jax.random.key(6), y_obs, observed, 40000, eps=eps))
  assert ys.shape == (40000, g.num_slices, g.latent_dim)
  np.testing.assert_array_equal(ys[:, observed], np.broadcast_to(y_obs[observed],
                                                                 ys[:, observed].shape))
  free = ys[:, ~observed].astype(np.float64)                   # [num, U, L]
  np.testing.assert_allclose(free.mean(axis=0), want_mean, atol=0.03)
  emp = _sample_cov(free)
  for i in range(g.latent_dim):
    assert _rel(emp[i], want_cov[i]) < 0.04, i
  again = lg.conditional_sample(g, jax.random.key(6), y_obs, observed, 3, eps=eps)
  np.testing.assert_array_equal(again, lg.conditional_sample(g, jax.random.key(6), y_obs,
                                                              observed, 3, eps=eps))


def test_conditioning_with_a_traced_mask_and_edge_cases():
  g = _fitted(s=6, rank=3)
  y_obs = np.asarray(lg.sample(g, jax.random.key(9), 1)[0])
  observed = np.array([False, True, True, False, False, True])
  jitted = jax.jit(lambda m: lg.conditional_mean(g, y_obs, m, eps=1e-3))
  np.testing.assert_allclose(jitted(jnp.asarray(observed)),
                             lg.conditional_mean(g, y_obs, observed, eps=1e-3), atol=1e-5)
  # Nothing observed: the prior mean. Everything observed: the observation.
  np.testing.assert_allclose(lg.conditional_mean(g, y_obs, np.zeros(6, bool)), g.mean,
                             atol=1e-6)
  np.testing.assert_array_equal(lg.conditional_mean(g, y_obs, np.ones(6, bool)), y_obs)
  with pytest.raises(ValueError):
    lg.conditional_sample(g, jax.random.key(0), y_obs, observed[:3], 2)


def test_save_load_round_trip(tmp_path):
  g = _fitted()
  meta = {"slice_axis": 2, "grid": [64, 64, 64], "voxel_size": [1.0, 1.0, 1.0],
          "affine": np.eye(4) * 2.0, "latent_shape": [2, 2, 256], "bn_mode": "batch",
          "checkpoint_step": np.int64(1200), "nested": {"a": [1, 2]}}
  path = tmp_path / "sub" / "latent_gaussian.npz"
  lg.save(path, g, meta)
  h, got = lg.load(path)
  for name in ("mean", "W", "singular_values"):
    np.testing.assert_array_equal(getattr(h, name), getattr(g, name))
  assert h.num_train == g.num_train and h.rank == g.rank
  assert got["affine"] == (np.eye(4) * 2.0).tolist()
  assert got["checkpoint_step"] == 1200 and got["nested"] == {"a": [1, 2]}
  assert got["bn_mode"] == "batch" and got["slice_axis"] == 2
  assert [p.name for p in path.parent.iterdir()] == ["latent_gaussian.npz"]  # no temp files


def test_load_rejects_missing_corrupt_and_foreign_files(tmp_path):
  missing = tmp_path / "nope.npz"
  with pytest.raises(DataError, match="nope.npz"):
    lg.load(missing)
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(b"definitely not a zip file")
  with pytest.raises(DataError, match="corrupt.npz"):
    lg.load(corrupt)
  truncated = tmp_path / "truncated.npz"
  lg.save(truncated, _fitted(), {})
  truncated.write_bytes(truncated.read_bytes()[:200])
  with pytest.raises(DataError, match="truncated.npz"):
    lg.load(truncated)
  foreign = tmp_path / "foreign.npz"
  np.savez(foreign, mean=np.zeros((3, 2)))
  with pytest.raises(DataError, match="foreign.npz.*missing"):
    lg.load(foreign)


# ----------------------------------------------------------------------------- joint and rotated


def _dense_cov(g):
  """The model's covariance of vec(y) (index s·L + l), float64 [D, D], built from its
  parameters independently of the library's views: per_dim block diagonal over entries,
  rotated that conjugated by R (y = ỹ Rᵀ), joint W Wᵀ."""
  w = np.asarray(g.W, np.float64)
  s, l = g.num_slices, g.latent_dim
  if g.kind == "joint":
    return w[0] @ w[0].T
  c = np.zeros((s, l, s, l))
  for k in range(l):
    c[:, k, :, k] = w[k] @ w[k].T
  if g.kind == "rotated":
    r = np.asarray(g.rotation, np.float64)
    c = np.einsum("lk,skti,mi->sltm", r, c, r)
  return c.reshape(s * l, s * l)


def _vec_cov(y):
  """ddof=0 covariance of vec(y) over volumes, [D, D]."""
  x = y.reshape(len(y), -1)
  x = x - x.mean(axis=0)
  return x.T @ x / len(y)


def _rotated_truth(rng, s, l, n):
  """Data of a rotated model with a known R: per-entry slice factors in a random
  orthonormal channel basis Q, whose pooled channel variances are distinct."""
  mu, a = _known_model(rng, s, l, scales=[3.0, 2.0, 1.0])
  q, _ = np.linalg.qr(rng.normal(size=(l, l)))
  truth = np.zeros((s, l, s, l))
  for k in range(l):
    truth[:, k, :, k] = a[k] @ a[k].T
  truth = np.einsum("lk,skti,mi->sltm", q, truth, q).reshape(s * l, s * l)
  return _draw(rng, np.zeros_like(mu), a, n) @ q.T + mu, truth, q


def test_joint_recovers_a_covariance_mixing_entries_and_slices():
  rng = np.random.default_rng(10)
  s, l, n, r = 5, 3, 4000, 4
  a = rng.normal(size=(s * l, r)) * np.array([3.0, 2.0, 1.5, 1.0])   # dense: every entry, slice
  mu = rng.normal(size=(s, l))
  y = (rng.normal(size=(n, r)) @ a.T).reshape(n, s, l) + mu
  g = lg.fit(y, rank=r, model="joint")
  assert (g.kind, g.factor_shape, g.W.shape, g.rotation) == ("joint", (1, r), (1, s * l, r), None)
  truth = a @ a.T
  assert _rel(_dense_cov(g), truth) < 0.08
  np.testing.assert_allclose(g.mean, mu, atol=0.2)
  np.testing.assert_allclose(lg.explained_variance(g), [1.0], atol=1e-5)
  # per_dim keeps each entry's slice covariance but no covariance across entries.
  per_dim = _dense_cov(lg.fit(y, rank=s))
  assert _rel(per_dim, truth) > 0.3
  assert np.all(per_dim.reshape(s, l, s, l)[:, 0, :, 1] == 0)


def test_rotated_recovers_a_rotated_model_where_per_dim_cannot():
  rng = np.random.default_rng(11)
  y, truth, q = _rotated_truth(rng, s=6, l=3, n=4000)
  g = lg.fit(y, rank=3, model="rotated")
  assert (g.kind, g.factor_shape, g.rotation.shape) == ("rotated", (3, 3), (3, 3))
  r = np.asarray(g.rotation, np.float64)
  np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-5)
  # Channel k of the truth has variance growing with k, so R is Q in reverse order,
  # up to column signs.
  np.testing.assert_allclose(np.abs(q[:, ::-1].T @ r), np.eye(3), atol=0.03)
  assert _rel(_dense_cov(g), truth) < 0.08
  assert _rel(_dense_cov(lg.fit(y, rank=3, model="joint")), truth) > 0.1   # rank 3 of 9
  assert _rel(_dense_cov(lg.fit(y, rank=9, model="joint")), truth) < 0.08
  assert _rel(_dense_cov(lg.fit(y, rank=3)), truth) > 0.3


def test_rotated_is_per_dim_on_the_pca_rotated_channels():
  y = np.random.default_rng(12).normal(size=(30, 5, 4)) @ np.random.default_rng(13).normal(
      size=(4, 4))
  g = lg.fit(y, rank=3, model="rotated")
  x = y - y.mean(axis=0)
  vals, vecs = np.linalg.eigh(np.einsum("nsl,nsk->lk", x, x))
  # Descending eigenvalue order; each column up to sign.
  np.testing.assert_allclose(np.abs(np.sum(vecs[:, ::-1] * np.asarray(g.rotation), axis=0)),
                             1.0, atol=1e-4)
  ref = lg.fit(y @ np.asarray(g.rotation, np.float64), rank=3)
  np.testing.assert_allclose(np.einsum("lsp,ltp->lst", g.W, g.W),
                             np.einsum("lsp,ltp->lst", ref.W, ref.W), atol=1e-4)
  np.testing.assert_allclose(g.singular_values, ref.singular_values, rtol=1e-4, atol=1e-5)
  assert np.all(np.diff(vals) >= 0)


@pytest.mark.parametrize("n,s,l", [(5, 4, 3), (40, 4, 3)])   # Gram route (D > N), SVD route
def test_full_rank_joint_is_the_sample_covariance(n, s, l):
  y = np.random.default_rng(n).normal(size=(n, s, l)) * np.linspace(0.5, 2.0, s * l).reshape(s, l)
  g = lg.fit(y, rank=1000, model="joint")
  assert g.rank == min(n - 1, s * l) and g.singular_values.shape == (1, min(n, s * l))
  ref = _vec_cov(y)
  np.testing.assert_allclose(g.mean, y.mean(axis=0), atol=1e-5)
  np.testing.assert_allclose(_dense_cov(g), ref, atol=1e-5 * np.abs(ref).max())
  vals = np.linalg.eigvalsh(ref)[::-1]
  np.testing.assert_allclose(np.square(g.singular_values[0]) / n, vals[:min(n, s * l)],
                             rtol=1e-4, atol=1e-5 * vals[0])
  # Truncation gives the best rank-2 approximation of that same covariance.
  w = np.asarray(lg.fit(y, rank=2, model="joint").W[0], np.float64)
  vals, vecs = np.linalg.eigh(ref)
  np.testing.assert_allclose(w @ w.T, (vecs[:, -2:] * vals[-2:]) @ vecs[:, -2:].T,
                             atol=1e-5 * np.abs(ref).max())


def test_model_choice_is_checked_and_joint_is_not_traceable():
  y = np.random.default_rng(14).normal(size=(6, 4, 3))
  with pytest.raises(ValueError, match="unknown latent model"):
    lg.fit(y, rank=2, model="full")
  with pytest.raises(ValueError, match="joint.*jit"):
    jax.jit(lambda y: lg.fit(y, 2, model="joint").W)(y)
  rotated = jax.jit(lambda y: lg.fit(y, 2, model="rotated"))(jnp.asarray(y, jnp.float32))
  eager = lg.fit(y, 2, model="rotated")
  assert rotated.kind == "rotated"
  np.testing.assert_allclose(lg.covariance(rotated), lg.covariance(eager), atol=1e-5)


def test_latent_model_config_key():
  from slicevae_jax import config_lib   # pylint: disable=import-outside-toplevel
  from slicevae_jax.errors import ConfigError   # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  assert c.latent.model == "per_dim" and lg.MODELS == config_lib.LATENT_MODELS
  c.latent.model = "full"
  with pytest.raises(ConfigError, match="latent.model"):
    config_lib.validate(c)


def _fitted_kind(kind, seed=15, s=5, l=3, n=300):
  rng = np.random.default_rng(seed)
  y, _, _ = _rotated_truth(rng, s, l, n)
  return lg.fit(y, rank=6 if kind == "joint" else 3, model=kind)


KINDS = ("per_dim", "joint", "rotated")


@pytest.mark.parametrize("kind", KINDS)
def test_covariance_is_each_entrys_marginal(kind):
  g = _fitted_kind(kind)
  s, l = g.num_slices, g.latent_dim
  dense = _dense_cov(g).reshape(s, l, s, l)
  cov = np.asarray(lg.covariance(g))
  assert cov.shape == (l, s, s)
  for i in range(l):
    np.testing.assert_allclose(cov[i], dense[:, i, :, i], atol=1e-5)
    np.testing.assert_allclose(lg.covariance(g, i), cov[i], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_log_density_matches_a_dense_normal(kind):
  g = _fitted_kind(kind)
  eps = 1e-2
  key_y, key_n = jax.random.split(jax.random.key(16))
  y = lg.sample(g, key_y, 5) + 0.3 * jax.random.normal(key_n, (5, g.num_slices, g.latent_dim))
  got = np.asarray(lg.log_density(g, y, eps=eps))
  cov = _dense_cov(g) + eps * np.eye(g.num_slices * g.latent_dim)
  want = stats.multivariate_normal(np.asarray(g.mean, np.float64).ravel(), cov).logpdf(
      np.asarray(y, np.float64).reshape(5, -1))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_conditionals_match_the_dense_schur_complement(kind):
  g = _fitted_kind(kind, s=6)
  eps, s, l = 1e-2, g.num_slices, g.latent_dim
  observed = np.array([True, False, True, False, False, True])
  y_obs = np.asarray(lg.sample(g, jax.random.key(17), 1)[0], np.float64)
  o = np.repeat(observed, l)                                   # vec index s·L + l
  sig = _dense_cov(g) + eps * np.eye(s * l)
  mu = np.asarray(g.mean, np.float64).ravel()
  gain = sig[np.ix_(~o, o)] @ np.linalg.inv(sig[np.ix_(o, o)])
  want_mean = mu[~o] + gain @ (y_obs.ravel()[o] - mu[o])
  want_cov = sig[np.ix_(~o, ~o)] - gain @ sig[np.ix_(o, ~o)]

  y_in = y_obs.copy()
  y_in[~observed] = np.nan                                     # unobserved rows are never read
  mean = np.asarray(lg.conditional_mean(g, y_in, observed, eps=eps))
  np.testing.assert_array_equal(mean[observed], y_obs[observed].astype(np.float32))
  np.testing.assert_allclose(mean.ravel()[~o], want_mean, rtol=1e-4, atol=1e-4)

  ys = np.asarray(lg.conditional_sample(g, jax.random.key(18), y_in, observed, 40000, eps=eps))
  assert ys.shape == (40000, s, l)
  assert np.all(ys[:, observed] == y_obs[observed].astype(np.float32))
  free = ys.reshape(40000, -1)[:, ~o].astype(np.float64)
  np.testing.assert_allclose(free.mean(axis=0), want_mean, atol=0.03)
  assert _rel(_vec_cov(free[:, None, :]), want_cov) < 0.04


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_is_reproducible_and_works_jitted_in_vmap(kind):
  from slicevae_jax.slicevae import inference   # pylint: disable=import-outside-toplevel
  g = _fitted_kind(kind)
  a = lg.sample(g, jax.random.key(7), 3)
  np.testing.assert_array_equal(a, lg.sample(g, jax.random.key(7), 3))
  assert not np.allclose(a, lg.sample(g, jax.random.key(8), 3))
  assert not np.allclose(a[0], a[1])
  key = jax.random.key(19)
  got = inference._sample_latents(g, key, jnp.arange(2, 4))   # pylint: disable=protected-access
  for j, i in enumerate((2, 3)):
    np.testing.assert_allclose(got[j], lg.sample(g, jax.random.fold_in(key, i), 1)[0],
                               atol=1e-6)
  z = jax.random.normal(jax.random.key(20), (4,) + g.factor_shape)
  np.testing.assert_allclose(lg.from_latent(g, lg.to_latent(g, z)), z, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_per_kind(tmp_path, kind):
  g = _fitted_kind(kind)
  path = tmp_path / f"{kind}.npz"
  lg.save(path, g, {"rank": g.rank})
  h, meta = lg.load(path)
  assert (h.kind, h.num_train, meta) == (kind, g.num_train, {"rank": g.rank})
  for name in ("mean", "W", "singular_values", "rotation"):
    np.testing.assert_array_equal(getattr(h, name), getattr(g, name))
  y = lg.sample(g, jax.random.key(21), 2)
  np.testing.assert_array_equal(lg.log_density(h, y), lg.log_density(g, y))
  with np.load(path) as npz:
    assert int(npz["format_version"]) == 2 and str(npz["model"]) == kind


def _rewrite(src, dst, drop=(), **replace):
  with np.load(src) as npz:
    arrays = {k: npz[k] for k in npz.files if k not in drop}
  arrays.update(replace)
  np.savez(dst, **arrays)


def test_load_reads_version_1_and_refuses_unknown_versions_and_models(tmp_path):
  g = _fitted()
  v2 = tmp_path / "v2.npz"
  lg.save(v2, g, {"checkpoint_step": 3})
  v1 = tmp_path / "v1.npz"                                     # as written before latent.model
  _rewrite(v2, v1, drop=("model",), format_version=np.asarray(1, np.int64))
  h, meta = lg.load(v1)
  assert h.kind == "per_dim" and h.rotation is None and meta == {"checkpoint_step": 3}
  np.testing.assert_array_equal(h.W, g.W)

  cases = {"v3.npz": dict(format_version=np.asarray(3, np.int64)),
           "alien.npz": dict(model=np.asarray("full")),
           "joint_shape.npz": dict(model=np.asarray("joint"))}   # W is [L, S, P], not [1, D, P]
  for name, replace in cases.items():
    _rewrite(v2, tmp_path / name, **replace)
  _rewrite(v2, tmp_path / "nomodel.npz", drop=("model",))
  rotated = tmp_path / "rotated.npz"
  lg.save(rotated, _fitted_kind("rotated"), {})
  _rewrite(rotated, tmp_path / "norotation.npz", drop=("rotation",))
  _rewrite(rotated, tmp_path / "skew.npz", rotation=2.0 * np.eye(3, dtype=np.float32))
  for name, match in (("v3.npz", "format version 3"), ("alien.npz", "unknown latent model"),
                      ("joint_shape.npz", "inconsistent shapes"), ("nomodel.npz", "'model'"),
                      ("norotation.npz", "'rotation'"), ("skew.npz", "not orthonormal")):
    with pytest.raises(DataError, match=f"{name}.*{match}"):
      lg.load(tmp_path / name)
