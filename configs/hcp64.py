r"""HCP T1w at 64³, the paper's settings (Volokitin et al. 2020, §3).

Data: a folder of HCP subjects (<root>/<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz,
labels from T1w/aparc+aseg.nii.gz when present) or a flat folder of .nii/.nii.gz.

  python -m slicevae_jax.main --config=configs/hcp64.py --workdir=runs/hcp64 \
      --config.data.root=/data/HCP

Stages: preprocess (N4, 1st/99th percentile scaling, crop/pad and linear
resampling to 64³ at 2.8 mm) -> train the slice VAE (Adam 1e-3, batch 128 coronal
slices) -> fit the latent Gaussian on 400 training volumes -> sample 16 volumes.
Step counts follow the released checkpoints; bench/RESULTS.md has measured
step rates to turn them into hours on your hardware.

Variants: 'smoke' (tiny grid and model, 4 steps: checks a data folder end to end
in about a minute on a CPU), e.g. --config=configs/hcp64.py:smoke.
"""

from slicevae_jax import config_lib

common = config_lib.load_module("common.py", beside=__file__)


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  config = common.hcp_recipe()          # N4, 40 held out, batch 128, Adam 1e-3, N = 400
  config.name = "hcp64"
  config.data.grid = 64
  config.data.voxel_size = 2.8            # mm: 0.7 · 256 / 64
  config.data.cache_dtype = "float32"
  config.model.base_width = 16            # gf
  config.latent.rank = 64                 # P (full rank: S = 64 slices)
  config.train.num_steps = 74_000         # the released checkpoint's
  if args.smoke:
    config = common.smoke(config)
  return config
