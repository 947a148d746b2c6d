"""Latent fit on a trained workdir, sampling, decoding and the NIfTI/PNG outputs."""

import os

import jax
import nibabel as nib
import numpy as np
import pytest

from helpers import make_cache, tiny_config
from slicevae_jax import checkpoint as ckpt_lib
from slicevae_jax import parallel, pipeline
from slicevae_jax import workdir as workdir_lib
from slicevae_jax.data.cache import to_stack
from slicevae_jax.models import slice_vae
from slicevae_jax.slicevae import fit_latent, inference, train
from slicevae_jax.slicevae import latent as lg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir with a (randomly initialised) checkpoint and a fitted latent model."""
  root = tmp_path_factory.mktemp("w")
  cache = make_cache(str(root / "cache"), num=6, grid=16, num_val=2, slice_axis=1)
  config = tiny_config()
  wd = str(root / "run")
  os.makedirs(wd)
  workdir_lib.save_config(config, wd)
  mesh = parallel.make_mesh()
  model = slice_vae.from_config(config)
  state = train.create_state(model, train.make_optimizer(config), mesh, jax.random.key(0))
  ckpt = ckpt_lib.Checkpointer(workdir_lib.checkpoint_dir(wd))
  ckpt.save(7, state)
  ckpt.close()
  fit_latent.fit_latent(config, wd, cache)
  return wd, cache, config


def test_latent_file_has_what_sampling_needs(workdir):
  wd, cache, config = workdir
  g, meta = lg.load(workdir_lib.latent_file(wd))
  assert meta["checkpoint_step"] == 7 and meta["slice_axis"] == 1
  assert g.mean.shape == (16, 2 * 2 * 8) and g.W.shape[:2] == (32, 16)
  assert g.W.shape[2] == min(config.latent.rank, meta["num_volumes"])
  np.testing.assert_allclose(meta["affine"], cache.affine(0))
  assert fit_latent.is_current(wd, config, 7) and not fit_latent.is_current(wd, config, 8)
  assert meta["fit_inputs"] == fit_latent.fit_inputs(config, 7)


def test_fitted_mean_is_the_mean_encoding(workdir):
  wd, cache, _ = workdir
  bundle = inference.load_for_inference(wd)
  ids = [cache.subjects.index(next(s for s in cache.subjects if s["id"] == i))
         for i in bundle.meta["subjects"]]
  y = inference.encode_stacks(bundle, np.stack([cache.stack(i) for i in ids]))
  np.testing.assert_allclose(bundle.gaussian.mean, y.mean(axis=0), atol=1e-4)


def test_same_key_same_volume_and_keys_differ(workdir):
  bundle = inference.load_for_inference(workdir[0])
  a = inference.sample_volumes(bundle, jax.random.key(3), 3, batch=2)
  b = inference.sample_volumes(bundle, jax.random.key(3), 3, batch=8)
  c = inference.sample_volumes(bundle, jax.random.key(4), 3)
  assert a.shape == (3, 16, 16, 16) and a.min() >= 0 and a.max() <= 1
  np.testing.assert_allclose(a, b, atol=1e-6)               # batching does not matter
  np.testing.assert_allclose(a[2], inference.sample_volumes(
      bundle, jax.random.key(3), 1, start=2)[0], atol=1e-6)  # nor how many are drawn
  assert np.abs(a - c).max() > 1e-3
  assert np.abs(a[0] - a[1]).max() > 1e-3


@pytest.mark.parametrize("bn_mode", ["running", "volume"])
def test_vmapped_decode_equals_loop(workdir, bn_mode):
  bundle = inference.load_for_inference(workdir[0])
  bundle.model = bundle.model.clone(bn_mode=bn_mode)
  y = inference.sample_latents(bundle, jax.random.key(0), 3)      # [3, S, L]
  vols = inference.decode_latents(bundle, y, batch=2)
  for n in range(3):
    z = y[n].reshape((-1,) + bundle.latent_shape)
    if bn_mode == "running":   # slices are independent: one at a time
      slices = [slice_vae.apply_inference(bundle.model, bundle.variables, z[s:s + 1], "decode")
                for s in range(len(z))]
      stack = np.concatenate([np.asarray(x) for x in slices])[..., 0]
    else:                      # a volume's stack is one BatchNorm batch
      stack = np.asarray(slice_vae.apply_inference(bundle.model, bundle.variables, z,
                                                   "decode"))[..., 0]
    np.testing.assert_allclose(to_stack(vols[n], bundle.slice_axis), np.clip(stack, 0, 1),
                               atol=1e-5)


def test_write_samples_nifti_and_png(workdir):
  wd, cache, config = workdir
  paths = pipeline.write_samples(config, wd)
  assert len(paths) == config.sample.num_volumes
  img = nib.load(paths[0])
  assert img.shape == (16, 16, 16)
  np.testing.assert_allclose(img.affine, cache.affine(0), atol=1e-5)
  np.testing.assert_allclose(img.header.get_zooms(), cache.voxel_size, atol=1e-5)
  bundle = inference.load_for_inference(wd)
  first = inference.sample_volumes(bundle, jax.random.key(config.sample.seed), 1)[0]
  np.testing.assert_allclose(np.asarray(img.dataobj), first, atol=1e-6)
  assert os.path.exists(paths[0].replace(".nii.gz", ".png"))
  assert pipeline.samples_current(wd, config, 7)


def test_missing_latent_or_checkpoint_is_clear(tmp_path, workdir):
  from slicevae_jax.errors import DataError
  with pytest.raises(DataError, match="config.json"):
    inference.load_for_inference(str(tmp_path))
  workdir_lib.save_config(workdir[2], str(tmp_path))
  with pytest.raises(DataError, match="checkpoint"):
    inference.load_for_inference(str(tmp_path))


def test_notebook_api_from_the_package(workdir):
  from slicevae_jax import load_for_inference, sample_volumes
  vols = sample_volumes(load_for_inference(workdir[0]), jax.random.key(0), num=1)
  assert vols.shape == (1, 16, 16, 16)
