r"""Every model of the paper's Table 1 on the embedded default data at 64³, one equal budget.

  python -m slicevae_jax.main --mode=compare --config=configs/compare.py --workdir=runs/compare

Trains the slice VAE (the `demo.py` settings) and the five 3D baselines
(WGAN-GP, VAE-GAN, α-GAN, α-WGAN, 3D VAE; `baselines.py` settings) on one
shared cache of the embedded default data set, each for the same number of
passes over the 64 training volumes, samples 8 volumes from each, trains one
RAS segmenter (the demo's: Dice + cross-entropy, partly blurred slices), and writes <workdir>/eval/report.md: Table 1 (MMD, MS-SSIM, RAS,
with the real-data row) and the Fig. 4 RAS chart for all models.

Budget: `compare.epochs` passes over the training volumes for every model
(default 12.5, the slice VAE demo's 1600 steps × 32 slices; the baselines get
200 steps of 4 volumes). Networks at the paper's full width.

Variants:
  cpu     the baselines at 1/16 width (max_channels 32, latent 128, code critic
          512 wide) and 2 passes over the data, so the whole comparison fits a
          few CPU hours; the widths are recorded in the report. 3D convolutions
          are slow on XLA's CPU backend (bench/RESULTS.md): use a GPU for the
          full-width comparison.
  smoke   32³, tiny networks, a few steps: checks the comparison end to end.
"""

from slicevae_jax import config_lib

common = config_lib.load_module("common.py", beside=__file__)


def get_config(arg=None):
  args = common.parse_arg(arg, cpu=False, smoke=False, epochs=0.0)
  config = common.get("demo", "smoke" if args.smoke else None)
  config.name = "compare64" if not args.smoke else "compare_smoke"
  c = config.compare
  c.models = config_lib.MODEL_TYPES
  # The slice VAE demo's budget in passes over the training volumes.
  n_train = config.data.synth.num_subjects - config.data.num_val
  c.epochs = config.train.num_steps * config.train.batch_size / config.data.grid / n_train
  c.baseline_batch = 4
  if args.cpu:
    b = config.baseline
    b.max_channels, b.min_channels, b.latent_dim = 32, 4, 128
    b.code_hidden, b.encoder_hidden = 512, 256
    c.epochs = 2.0
  if args.smoke:
    c.epochs = 0.5
    c.baseline_batch = 8
  if args.epochs:
    c.epochs = args.epochs
  return config
