"""Density tools: per-slice log densities, scores that separate corrupted volumes, completion,
interpolation and the memorisation audit, on a small model trained in the module fixture."""

import os

import jax
import numpy as np
import pytest

from helpers import tiny_config
from slicevae_jax import pipeline
from slicevae_jax.slicevae import density, density_stages, inference
from slicevae_jax.slicevae import latent as lg
from slicevae_jax.data.cache import CacheWriter, to_stack

GRID = 16


def head(rng: np.random.Generator) -> np.ndarray:
  """A 'brain' [16]³ that is not symmetric superior–inferior (RAS z): brighter on top, with a
  bright blob low at the back, so a flipped volume differs from every real one."""
  c = (np.arange(GRID) - GRID / 2 + 0.5) / (GRID / 2)
  x, y, z = np.meshgrid(c, c, c, indexing="ij")
  a = rng.uniform(0.65, 0.85, 3)
  outer = (x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2 < 1
  blob = x ** 2 + (y + 0.35) ** 2 + (z + rng.uniform(0.35, 0.5)) ** 2 < 0.1
  v = np.where(outer, 0.35 + 0.3 * (z + 1) / 2 + rng.uniform(-0.05, 0.05), 0.0)
  v = np.where(outer & blob, 0.95, v)
  return np.clip(v + rng.normal(0, 0.01, v.shape) * outer, 0, 1).astype(np.float32)


def corruptions(val: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The issue's atypical volumes: flipped superior–inferior, inverted (inside the head),
  a block of slices replaced by noise, pure noise."""
  block = val.copy()
  block[:, :, 5:10, :] = rng.uniform(0, 1, block[:, :, 5:10, :].shape)
  return {"flipped": val[..., ::-1], "inverted": np.where(val > 0, 1.0 - val, 0.0),
          "noise_block": block, "noise": rng.uniform(0, 1, val.shape).astype(np.float32)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 16³ slice VAE trained 60 steps on 12 heads (4 held out), all three latent models."""
  root = str(tmp_path_factory.mktemp("density"))
  rng = np.random.default_rng(0)
  num, num_val = 16, 4
  entries = [{"id": f"s{i:02d}", "split": "val" if i >= num - num_val else "train"}
             for i in range(num)]
  w = CacheWriter(os.path.join(root, "cache"), entries, (GRID,) * 3, 1, "float32", False)
  affine = np.diag([2.0, 2.0, 2.0, 1.0])
  affine[:3, 3] = -GRID
  for i in range(num):
    w.write(i, head(rng), affine)
  cache = w.finalize({"label_names": None})
  config = tiny_config(num_steps=60, learning_rate=3e-3)
  config.data.cache_dir = cache.path
  config.latent.num_volumes = 12
  config.latent.rank = 8
  wd = os.path.join(root, "run")
  pipeline.run(config, wd, "train")
  pipeline.run(config, wd, "fit_latent")
  bundle = inference.load_for_inference(wd)
  val = np.stack([cache.volume(i) for i in cache.split("val")])
  return wd, cache, bundle, val


# ---------------------------------------------------------------------------- maths


@pytest.mark.parametrize("kind", ["per_dim", "joint", "rotated"])
def test_slice_log_density_is_the_leave_one_slice_out_conditional(kind):
  rng = np.random.default_rng(0)
  s_num, l_num, eps = 5, 3, 1e-2
  y = rng.normal(size=(12, s_num, l_num)) @ rng.normal(size=(l_num, l_num))
  g = lg.fit(np.asarray(y, np.float32), 3, model=kind)
  q = rng.normal(size=(2, s_num, l_num))
  # The dense covariance of the stack from the model's own map z -> y.
  d = s_num * l_num
  basis = np.eye(np.prod(g.factor_shape)).reshape((-1,) + g.factor_shape)
  cols = (np.asarray(lg.to_latent(g, basis.astype(np.float32)), np.float64)
          - np.asarray(g.mean)).reshape(len(basis), d)
  cov = cols.T @ cols + eps * np.eye(d)
  x = q.reshape(2, d) - np.asarray(g.mean, np.float64).reshape(d)
  want = np.zeros((2, s_num))
  for s in range(s_num):
    b = np.arange(s * l_num, (s + 1) * l_num)
    r = np.setdiff1d(np.arange(d), b)
    k = cov[np.ix_(b, r)] @ np.linalg.inv(cov[np.ix_(r, r)])
    c = cov[np.ix_(b, b)] - k @ cov[np.ix_(r, b)]
    e = x[:, b] - x[:, r] @ k.T
    want[:, s] = -0.5 * (np.einsum("ni,ij,nj->n", e, np.linalg.inv(c), e)
                         + np.linalg.slogdet(c)[1] + l_num * np.log(2 * np.pi))
  np.testing.assert_allclose(density.slice_log_density(g, q, eps), want, rtol=1e-5, atol=1e-4)


def test_percentiles_masks_and_slice_lists():
  np.testing.assert_allclose(density.percentile_of([0.0, 2.5, 9.0], [1.0, 2.0, 3.0, 4.0]),
                             [0.0, 50.0, 100.0])
  np.testing.assert_allclose(density.percentile_of([5.0], [1.0, 2.0, 5.0, 6.0], False), [50.0])
  assert density.keep_every(8, 4).tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
  assert np.flatnonzero(density.parse_slices("2:4, 6", 8)).tolist() == [2, 3, 6]
  with pytest.raises(ValueError, match="'9'"):
    density.parse_slices("1,9", 8)


def test_audit_flags_copies_and_not_fresh_draws():
  rng = np.random.default_rng(1)
  train = rng.normal(size=(20, 4, 4, 4)).astype(np.float32)
  heldout = rng.normal(size=(8, 4, 4, 4)).astype(np.float32)
  copies = train[:6] + rng.normal(0, 0.01, (6, 4, 4, 4)).astype(np.float32)
  fresh = rng.normal(size=(6, 4, 4, 4)).astype(np.float32)
  a = density.memorisation_audit(copies, list(train), heldout)["voxel"]
  assert a["nearest_train"].tolist() == list(range(6))
  assert a["closer_to_train"] == 1.0 and a["below_all_heldout"] == 1.0
  assert a["nearer_train_than_heldout"] == 1.0
  assert a["closer_to_train_reference"] == pytest.approx(0.5)
  b = density.memorisation_audit(fresh, train, heldout)["voxel"]
  assert 0.15 < b["closer_to_train"] < 0.85 and b["below_all_heldout"] < 0.5
  # The nearest held-out volume of a held-out volume's copy is that volume.
  c = density.memorisation_audit(heldout[:3] + 1e-3, train, heldout)["voxel"]
  assert c["nearest_heldout"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------- trained model


def test_real_volumes_typical_corrupted_below_every_real(trained):
  wd, _, bundle, val = trained
  models = density_stages.latent_models(wd, bundle, "")
  assert set(models) == {"per_dim", "joint", "rotated"}
  real = density.score_volumes(bundle, val, val, models)
  for kind in models:
    assert np.median(real.log_density_percentile[kind]) >= 50
  for name, vols in corruptions(val, np.random.default_rng(2)).items():
    s = density.score_volumes(bundle, vols, val, models)
    for kind in models:
      assert s.log_density[kind].max() < real.log_density[kind].min(), (name, kind)
      assert np.all(s.log_density_percentile[kind] == 0), (name, kind)


def test_completion_keeps_observed_slices_and_beats_nothing(trained):
  _, _, bundle, val = trained
  observed = density.keep_every(GRID, 2)
  key = jax.random.key(0)
  c = density.complete_volume(bundle, val[0], observed, key, num_samples=3)
  again = density.complete_volume(bundle, val[0], observed, key, num_samples=3)
  np.testing.assert_array_equal(c.samples, again.samples)
  got, want = to_stack(c.mean, 1), to_stack(val[0], 1)
  np.testing.assert_array_equal(got[observed], want[observed])
  assert np.all(to_stack(c.std, 1)[observed] == 0) and c.std[:, ~observed].max() > 0
  # What a missing slice holds is never read.
  blanked = val[0].copy()
  blanked[:, ~observed] = 0.7
  np.testing.assert_allclose(density.complete_volume(bundle, blanked, observed, key, 0).mean,
                             c.mean, atol=1e-6)
  err = np.mean(np.square(got[~observed] - want[~observed]))
  assert err < np.mean(np.square(want[~observed]))


def test_interpolation_endpoints_are_the_reconstructions(trained):
  _, _, bundle, val = trained
  for kind in ("per_dim", "joint"):
    g = lg.load(os.path.join(trained[0], f"latent_{kind}.npz"))[0] if kind != \
        bundle.gaussian.kind else bundle.gaussian
    path = density.interpolate_volumes(bundle, val[0], val[1], 4, g)
    plain = density.decode_stacks(bundle, density.encode_volumes(bundle, val[:2]))
    np.testing.assert_allclose(path.volumes[[0, -1]], plain, atol=1e-5)
    assert path.volumes.shape == (4,) + val.shape[1:] and path.t.tolist()[::3] == [0.0, 1.0]
    assert np.all((path.residual_fraction >= 0) & (path.residual_fraction <= 1 + 1e-6))
