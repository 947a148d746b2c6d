"""Diversity and distance metrics (paper §4.2): minibatch/Gaussian MMD and 3D MS-SSIM."""

import jax
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from slicevae_jax.metrics import mmd
from slicevae_jax.metrics import ms_ssim as msssim

WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])


def _smooth_volumes(seed, n, shape, sigma=2.0):
  """Random smooth volumes in [0, 1]: [n, *shape] float64."""
  rng = np.random.default_rng(seed)
  v = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(n)])
  v = (v - v.min()) / (v.max() - v.min())
  return v


# ---------------------------------------------------------------------------------------------
# An independent float64 NumPy MS-SSIM, written from the formulas.


def _window(n, kwon):
  c = n // 2 if kwon else (n - 1) / 2
  g = np.exp(-((np.arange(n) - c) ** 2) / (2 * 1.5**2))
  return g / g.sum()


def _blur(v, taps, kwon):
  for axis in range(3):
    w = _window(min(taps, v.shape[axis]), kwon)
    v = sliding_window_view(v, len(w), axis=axis) @ w      # valid correlation along `axis`
  return v


def _ref_ssim_cs(x, y, taps, kwon, L=1.0):
  c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
  mx, my = _blur(x, taps, kwon), _blur(y, taps, kwon)
  sxx = _blur(x * x, taps, kwon) - mx**2
  syy = _blur(y * y, taps, kwon) - my**2
  sxy = _blur(x * y, taps, kwon) - mx * my
  cs_map = (2 * sxy + c2) / (sxx + syy + c2)
  ssim_map = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs_map
  return ssim_map.mean(), cs_map.mean()


def _ref_pool(v):
  x, y, z = (s // 2 * 2 for s in v.shape)
  v = v[:x, :y, :z]
  return sum(v[i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)) / 8.0


def _ref_ms_ssim(x, y, kwon):
  taps = 13 if kwon else 11
  ssims, css = [], []
  for j in range(5):
    s, c = _ref_ssim_cs(x, y, taps, kwon)
    ssims.append(s)
    css.append(c)
    x, y = _ref_pool(x), _ref_pool(y)
  ssims, css = np.array(ssims), np.array(css)
  if kwon:
    # The reference, literally: pow1[:-1] * pow2[-1] is broadcast before the product.
    pow1, pow2 = css**WEIGHTS, ssims**WEIGHTS
    return np.prod(pow1[:-1] * pow2[-1])
  return np.prod(np.maximum(css[:4], 0) ** WEIGHTS[:4]) * max(ssims[4], 0) ** WEIGHTS[4]


# ---------------------------------------------------------------------------------------------
# MS-SSIM.


@pytest.fixture(scope="module")
def pair32():
  x = _smooth_volumes(0, 2, (32, 32, 32))
  noise = _smooth_volumes(1, 2, (32, 32, 32), sigma=1.0) - 0.5
  return x, np.clip(x + 0.3 * noise, 0, 1)


def test_ms_ssim_of_a_volume_with_itself_is_one(pair32):
  x, _ = pair32
  for kwon in (False, True):
    np.testing.assert_allclose(msssim.ms_ssim(x, x, kwon=kwon), 1.0, atol=1e-5)
  single = msssim.ms_ssim(x[0], x[0])                          # [X, Y, Z] in, scalar out
  assert single.shape == () and float(single) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_is_symmetric_and_falls_with_noise(pair32):
  x, y = pair32
  np.testing.assert_allclose(msssim.ms_ssim(x, y), msssim.ms_ssim(y, x), rtol=1e-5)
  noise = np.random.default_rng(2).normal(size=x.shape)
  values = [np.asarray(msssim.ms_ssim(x, np.clip(x + s * noise, 0, 1)))
            for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
  values = np.stack(values)                                    # [noise level, N]
  assert np.all(np.diff(values, axis=0) < 0), values
  assert np.all((values >= 0) & (values <= 1 + 1e-6))


def test_anticorrelated_pair_default_clamps_to_zero_kwon_gives_nan(pair32):
  x, _ = pair32
  np.testing.assert_allclose(msssim.ms_ssim(x, 1.0 - x), 0.0, atol=1e-6)
  assert np.all(np.isnan(np.asarray(msssim.ms_ssim(x, 1.0 - x, kwon=True))))


def test_kwon_switch_changes_the_value(pair32):
  # Halving the intensities lowers the coarsest-scale SSIM (luminance ≈ 0.8), which the
  # reference weights 4·w5 instead of w5, so the reference value is clearly lower.
  x, y = pair32
  y = 0.5 * y
  correct, kwon = np.asarray(msssim.ms_ssim(x, y)), np.asarray(msssim.ms_ssim(x, y, kwon=True))
  assert np.all(correct - kwon > 0.02), (correct, kwon)


def test_kwon_ms_ssim_matches_float64_reference_at_64():
  # 64³: scales 64, 32, 16, 8, 4 with windows 13, 13, 13, 8 (off-centre), 4 taps.
  x = _smooth_volumes(3, 1, (64, 64, 64))[0]
  y = np.clip(x + 0.2 * (_smooth_volumes(4, 1, (64, 64, 64), sigma=1.0)[0] - 0.5), 0, 1)
  assert msssim.scale_sizes(x.shape)[-1] == (4, 4, 4)
  got = float(msssim.ms_ssim(x, y, kwon=True))
  want = _ref_ms_ssim(x, y, kwon=True)
  assert 0.3 < want < 0.999
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_default_ms_ssim_and_ssim3d_match_float64_reference_on_odd_shapes():
  shape = (40, 36, 33)               # odd sizes floor under pooling; coarsest scale 2 x 2 x 2
  x = _smooth_volumes(5, 2, shape)
  y = np.clip(x + 0.2 * (_smooth_volumes(6, 2, shape, sigma=1.0) - 0.5), 0, 1)
  got = np.asarray(msssim.ms_ssim(x, y))
  want = [_ref_ms_ssim(a, b, kwon=False) for a, b in zip(x, y)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  got_ssim = np.asarray(msssim.ssim3d(x, y))
  want_ssim = [_ref_ssim_cs(a, b, 11, kwon=False)[0] for a, b in zip(x, y)]
  np.testing.assert_allclose(got_ssim, want_ssim, rtol=1e-4, atol=1e-5)


def test_ms_ssim_bad_input():
  a, b = np.zeros((2, 32, 32, 32)), np.zeros((2, 32, 32, 31))
  with pytest.raises(ValueError, match=r"\(2, 32, 32, 32\).*\(2, 32, 32, 31\)"):
    msssim.ms_ssim(a, b)
  with pytest.raises(ValueError, match="too small"):
    msssim.ms_ssim(np.zeros((16, 16, 16)), np.zeros((16, 16, 16)))


def test_pairwise_ms_ssim_uses_distinct_pairs(pair32):
  x, y = pair32
  vols = np.concatenate([x, y])                                # [4, 32, 32, 32]
  out = msssim.pairwise_ms_ssim(vols, num_pairs=5, key=jax.random.key(0), batch=2)
  assert out["values"].shape == (5,) and out["pairs"].shape == (5, 2)
  assert np.all(out["pairs"][:, 0] != out["pairs"][:, 1])
  # Pair by pair, in the [2, ...] shape that is already compiled.
  direct = [msssim.ms_ssim(vols[[i, j]], vols[[j, i]])[0] for i, j in out["pairs"]]
  np.testing.assert_allclose(out["values"], direct, rtol=1e-5)
  assert out["mean"] == pytest.approx(np.mean(out["values"]))
  assert out["std"] == pytest.approx(np.std(out["values"]))
  same = msssim.pairwise_ms_ssim(np.repeat(x[:1], 3, axis=0), 3, jax.random.key(1), batch=2)
  assert same["mean"] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# MMD.


def test_kwon_mmd_is_the_squared_mean_difference():
  rng = np.random.default_rng(7)
  x = rng.uniform(-1, 1, size=(8, 10, 12, 9))
  y = rng.uniform(-1, 1, size=(8, 10, 12, 9)) + 0.1
  assert float(mmd.kwon_mmd(x, x)) == 0.0
  fx, fy = x.reshape(8, -1), y.reshape(8, -1)
  want = np.sum((fx.mean(0) - fy.mean(0)) ** 2)
  gram = (np.sum(fx @ fx.T) + np.sum(fy @ fy.T) - 2 * np.sum(fx @ fy.T)) / 64
  np.testing.assert_allclose(want, gram, rtol=1e-10)
  np.testing.assert_allclose(float(mmd.kwon_mmd(x, y)), want, rtol=1e-5)
  with pytest.raises(ValueError, match=r"\(8, 10, 12, 9\).*\(8, 10, 12, 8\)"):
    mmd.kwon_mmd(x, y[..., :8])


def test_kwon_protocol_maps_unit_range_and_reports_mean_std():
  shape = (6, 5, 4)
  d = np.prod(shape)
  real = np.full((10, *shape), 0.7)
  fake = np.full((3, *shape), 0.2)          # fewer generated volumes than real ones
  out = mmd.kwon_mmd_protocol(real, fake, key=jax.random.key(0), batch=4, repeats=3)
  assert out["values"].shape == (3,)
  # In [-1, 1] the means differ by 2·(0.7 − 0.2) on every voxel.
  np.testing.assert_allclose(out["values"], d * 1.0**2, rtol=1e-5)
  assert out["std"] == pytest.approx(0.0, abs=1e-3)


def test_kwon_protocol_random_sets_small_generated_set_and_sampler():
  rng = np.random.default_rng(8)
  real = rng.uniform(size=(10, 8, 8, 8))
  fake = rng.uniform(size=(3, 8, 8, 8)) * 0.9
  a = mmd.kwon_mmd_protocol(real, fake, key=jax.random.key(1), batch=4, repeats=5)
  b = mmd.kwon_mmd_protocol(real, fake, key=jax.random.key(1), batch=4, repeats=5)
  c = mmd.kwon_mmd_protocol(real, fake, key=jax.random.key(2), batch=4, repeats=5)
  np.testing.assert_array_equal(a["values"], b["values"])
  assert not np.array_equal(a["values"], c["values"])
  assert np.all(a["values"] > 0)
  assert a["mean"] == pytest.approx(a["values"].mean()) and a["std"] == pytest.approx(
      a["values"].std())
  # One batch holding the whole real set, paired with the same set reshuffled: MMD 0.
  same = mmd.kwon_mmd_protocol(real, real[::-1].copy(), key=jax.random.key(3), batch=10,
                               repeats=2)
  np.testing.assert_allclose(same["values"], 0.0, atol=1e-6)
  # A sampler is called once per real batch with a fresh key.
  calls = []

  def sampler(key, n):
    calls.append(n)
    return np.asarray(jax.random.uniform(key, (n, 8, 8, 8)))

  s = mmd.kwon_mmd_protocol(real, sampler, key=jax.random.key(4), batch=4, repeats=2)
  assert calls == [4] * 4 and np.all(np.isfinite(s["values"]))
  with pytest.raises(ValueError, match="N = 3 < B = 4"):
    mmd.kwon_mmd_protocol(real[:3], fake, key=jax.random.key(0), batch=4, repeats=1)


def _np_gaussian_mmd(x, y, sigma, unbiased=True):
  z = np.concatenate([x.reshape(len(x), -1), y.reshape(len(y), -1)])
  delta = ((z[:, None, :] - z[None, :, :]) ** 2).mean(-1)
  k = np.exp(-delta / (2 * sigma**2))
  n, m = len(x), len(y)
  kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
  if unbiased:
    return ((kxx.sum() - n) / (n * (n - 1)) + (kyy.sum() - m) / (m * (m - 1))
            - 2 * kxy.mean()), delta
  return kxx.mean() + kyy.mean() - 2 * kxy.mean(), delta


def test_gaussian_mmd_matches_numpy_and_median_heuristic():
  rng = np.random.default_rng(9)
  x = rng.uniform(size=(6, 7, 6, 5))
  y = rng.uniform(size=(5, 7, 6, 5)) + 0.05
  value, sigma = mmd.gaussian_mmd(x, y, return_bandwidth=True)
  _, delta = _np_gaussian_mmd(x, y, 1.0)
  want_sigma = np.sqrt(np.median(delta[np.triu_indices(11, k=1)]) / 2)
  np.testing.assert_allclose(float(sigma), want_sigma, rtol=1e-5)
  np.testing.assert_allclose(float(value), _np_gaussian_mmd(x, y, want_sigma)[0], atol=1e-6)
  np.testing.assert_allclose(float(mmd.gaussian_mmd(x, y, bandwidth=0.3, unbiased=False)),
                             _np_gaussian_mmd(x, y, 0.3, unbiased=False)[0], atol=1e-6)


def test_gaussian_mmd_self_zero_and_grows_with_shift():
  rng = np.random.default_rng(10)
  x = rng.uniform(size=(16, 6, 6, 6))
  # Identical sets: the biased V-statistic is exactly 0; the unbiased U-statistic is
  # 2(ā − 1)/n ≤ 0, with ā the mean off-diagonal kernel value.
  assert float(mmd.gaussian_mmd(x, x, bandwidth=0.4, unbiased=False)) == pytest.approx(
      0.0, abs=1e-6)
  _, delta = _np_gaussian_mmd(x, x[:1], 0.4, unbiased=False)
  k = np.exp(-delta[:16, :16] / (2 * 0.4**2))
  a_bar = (k.sum() - 16) / (16 * 15)
  np.testing.assert_allclose(float(mmd.gaussian_mmd(x, x, bandwidth=0.4)),
                             2 * (a_bar - 1) / 16, atol=1e-6)
  # Two halves of one distribution: near 0. A growing intensity shift: growing MMD.
  halves = float(mmd.gaussian_mmd(x[:8], x[8:], bandwidth=0.4))
  shifts = [float(mmd.gaussian_mmd(x[:8], x[8:] + s, bandwidth=0.4))
            for s in (0.05, 0.1, 0.2, 0.4)]
  assert abs(halves) < 0.05
  assert np.all(np.diff([halves, *shifts]) > 0), (halves, shifts)
  kwon = [float(mmd.kwon_mmd(x[:8], x[8:] + s)) for s in (0.0, 0.05, 0.1, 0.2)]
  assert np.all(np.diff(kwon) > 0)
  with pytest.raises(ValueError, match=r"\(16, 6, 6, 6\).*\(16, 6, 6\)"):
    mmd.gaussian_mmd(x, x[..., 0])
