r"""HCP T1w at 256³, the paper's settings (Volokitin et al. 2020, §3; DESIGN §1, §5).

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


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False)
  config = config_lib.paper_config(256)
  if args.smoke:
    config = config_lib.smoke(config)
  return config
