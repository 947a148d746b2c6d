"""Named random streams: every random choice of every stage, derived from a seed by purpose.

One table, `STREAMS`, gives each purpose of `config.seed` a fixed id. Device-side
randomness is `key(seed, name)` = fold_in(key(seed), id); host-side choices are
`generator(seed, name)` = numpy default_rng([seed, id]). Items of a stream
(synthetic subject i, training step k, epoch e) are folded in below that, e.g.
subject i draws from fold_in(key(seed, 'synth'), i), so they can never meet
another purpose's stream, whatever the counts (subject 1001 is not the
segmenter's key), and resuming needs no RNG state.

Two stages have a seed of their own, so that a user can redraw them without
retraining: the samples (`sample_key`, from sample.seed: volume i draws from
fold_in(key, i)) and the metrics' random choices (`eval_key`, from eval.seed,
one id per metric in `EVAL_STREAMS`). The train/validation split of real data
(data.preprocess.split_subjects) is numpy default_rng(seed) itself: it runs in
the JAX-free preprocessing and predates the table, and a new stream would
re-split every existing cache.

An id is never reused or renumbered: that would change what every existing seed
produces. A new purpose gets a new id; a name is one use (a sampler's per-epoch
generators [seed, id, epoch] start at epoch 0 = [seed, id], because numpy's
SeedSequence ignores trailing zero words).
"""

import jax
import numpy as np

# name -> fixed id. Device keys (jax) and host generators (numpy) share the table.
STREAMS = {
    "synth": 1,             # synthetic subject i: fold_in(key(seed, 'synth'), i)
    "init": 2,              # slice VAE / 3D baseline parameters
    "train": 3,             # per-step noise of the training step (fold_in(., step))
    "eval": 4,              # noise of the validation loss during training
    "images": 5,            # prior samples in the training picture grids
    "train_batches": 6,     # host: per-epoch permutations of the training slices / volumes
    "val_slices": 7,        # host: the fixed held-out slices of the validation loss
    "latent_subjects": 8,   # host: which training volumes the latent fit encodes
    "segmenter_init": 9,    # RAS segmenter parameters
    "segmenter_train": 10,  # RAS segmenter per-step key
    "segmenter_batches": 11,  # host: per-epoch permutations of the segmenter's slices
    "complete": 12,         # conditional samples of --mode=complete (fold_in(., input i))
}

# Metric -> fixed id below key(eval.seed); as STREAMS, never reused or renumbered.
EVAL_STREAMS = {
    "mmd": 0,               # Kwon MMD: the real and generated batches of every pass
    "ms_ssim": 1,           # the random pairs of the generated set
    "ms_ssim_real": 2,      # the random pairs of the real set
}


def _id(name: str) -> int:
  try:
    return STREAMS[name]
  except KeyError:
    raise KeyError(f"unknown random stream {name!r}; add it to slicevae_jax.rng.STREAMS "
                   f"(known: {sorted(STREAMS)})") from None


def key(seed: int, name: str) -> jax.Array:
  """The JAX key of stream `name`: fold_in(key(seed), STREAMS[name])."""
  return jax.random.fold_in(jax.random.key(int(seed)), _id(name))


def entropy(seed: int, name: str) -> tuple[int, int]:
  """(seed, id): the numpy seed words of stream `name`; append item words (e.g. an epoch)."""
  return int(seed), _id(name)


def generator(seed: int, name: str) -> np.random.Generator:
  """A numpy Generator for the host-side choices of stream `name`."""
  return np.random.default_rng(list(entropy(seed, name)))



def sample_key(config) -> jax.Array:
  """The sample stage's key, from config.sample.seed; volume i draws from fold_in(key, i)."""
  return jax.random.key(int(config.sample.seed))


def eval_key(config, name: str) -> jax.Array:
  """The key of metric `name` (EVAL_STREAMS), from config.eval.seed."""
  return jax.random.fold_in(jax.random.key(int(config.eval.seed)), EVAL_STREAMS[name])
