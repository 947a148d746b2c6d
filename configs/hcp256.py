r"""HCP T1w at 256³, the paper's settings (Volokitin et al. 2020, §3).

Data: a folder of HCP subjects (<root>/<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz,
labels from T1w/aparc+aseg.nii.gz when present) or a flat folder of .nii/.nii.gz.

  python -m slicevae_jax.main --config=configs/hcp256.py --workdir=runs/hcp256 \
      --config.data.root=/data/HCP

Stages: preprocess (N4, 1st/99th percentile scaling, crop/pad and linear
resampling to 256³ at 0.7 mm) -> train the slice VAE (Adam 1e-3, batch 128 coronal
slices) -> fit the latent Gaussian on 400 training volumes -> sample 16 volumes.
Step counts follow the released checkpoints; bench/RESULTS.md has measured
step rates to turn them into hours on your hardware.

Variants: 'smoke' (tiny grid and model, 4 steps: checks a data folder end to end
in about a minute on a CPU), e.g. --config=configs/hcp256.py:smoke.
"""

from slicevae_jax import config_lib

common = config_lib.load_module("common.py", beside=__file__)


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  config = common.hcp_recipe()          # N4, 40 held out, batch 128, Adam 1e-3, N = 400
  config.name = "hcp256"
  config.data.grid = 256
  config.data.voxel_size = 0.7            # mm: 0.7 · 256 / 256
  config.data.cache_dtype = "uint8"
  config.model.base_width = 4             # gf
  config.latent.rank = 64                 # P (truncated: S = 256 slices)
  config.train.num_steps = 53_000         # the released checkpoint's
  # Paper §4.2: at 256³ the MMD used 10 passes of batch 4 (cost).
  config.eval.mmd_batch, config.eval.mmd_repeats, config.eval.pair_batch = 4, 10, 2
  if args.smoke:
    config = common.smoke(config)
  return config
