r"""The paper's 3D baselines (§3.1, Table 1; Kwon et al. 2019) on the slice VAE's machinery.

  python -m slicevae_jax.main --config=configs/baselines.py:model=alpha_wgan,res=128 \
      --config.data.root=/data/HCP --workdir=runs/alpha_wgan128

Arguments (comma-separated after the colon):
  model   wgan_gp | vae_gan | alpha_gan | alpha_wgan | vae3d   (default alpha_wgan)
  res     64 | 128 | 256                                         (default 64)
  demo    train on the embedded default data set instead of data.root
  smoke   32³, tiny networks, 2 steps: checks the pipeline in a minute

Settings, as the reference released them (paper §3.1, §3.3): whole volumes in [-1, 1],
batch 4, Adam(lr 2e-4, torch-default β = (0.9, 0.999)) for every network
(VAE-GAN 1e-4; our 3D VAE 1e-4), latent 1000 (3D VAE: 512·res/64), 200 000
iterations, channel widths 512 → 64 at 64³ with one more stage per doubling,
α-GAN with instance norm at 256³; update schedules and the reference's two bugs
(behind switches) are described in slicevae_jax/baselines/steps.py. Data preprocessing, the
held-out split and every evaluation setting are those of `hcp{res}.py`, so a
baseline and a slice VAE trained on the same data can share one cache
(--config.data.cache_dir) and are scored against the same held-out volumes.

The batch (4 volumes) must divide over the devices: on 8 GPUs use
--config.train.batch_size=8. At 256³ the full-width GANs need tens of GiB per
device; bench/bench_baselines.py measures step time and memory.

Stages: train, sample, evaluate (no fit_latent: a baseline samples N(0, I)).
Expected run time: days on one GPU at full length, as in the paper.
"""

from slicevae_jax import config_lib
from slicevae_jax.baselines import stages
from slicevae_jax.errors import ConfigError

common = config_lib.load_module("common.py", beside=__file__)
RESOLUTIONS = (64, 128, 256)


def get_config(arg=None):
  args = common.parse_arg(arg, model="alpha_wgan", res=64, demo=False, smoke=False)
  if args.res not in RESOLUTIONS:
    raise ConfigError(f"configs/baselines.py: res={args.res}; choose one of {list(RESOLUTIONS)}")
  # hcp{res}'s data and evaluation; batch 4 volumes and the model's learning rate
  # (stages.BASELINE_LR: 2e-4, VAE-GAN and the 3D VAE 1e-4).
  config = stages.as_baseline(common.get(f"hcp{args.res}"), args.model)
  t = config.train
  t.num_steps = 200_000
  t.log_every = 100
  t.eval_every = 2_000
  t.checkpoint_every = 2_000
  if args.demo:
    config.name += "_demo"
    config.data.source = "synthetic"
    config.data.n4 = False
    config.data.num_val = 8
    config.data.synth.num_subjects = 64
  if args.smoke:
    config = common.smoke(config)
    config.train.batch_size = 8
    config.train.num_steps = 2
  return config
