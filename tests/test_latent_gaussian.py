"""Latent Gaussian over the slice direction (paper §2.1): fit, sample, density, conditionals, files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from slicevae_jax import latent_gaussian as lg
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
