"""Command line: python -m slicevae_jax.main (or `slicevae`) --config=CONFIG --workdir=DIR.

Thin by design: parses flags, starts multi-host JAX when the config asks, and
hands over to `pipeline.run`. Every stage is callable from Python too.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from slicevae_jax import config_lib
from slicevae_jax import density_stages
from slicevae_jax import parallel
from slicevae_jax import pipeline
from slicevae_jax.errors import ConfigError, parse_flags, run_command

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/hcp128.py or configs/demo.py:smoke.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for the cache, checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "all", list(config_lib.MODES),
                  "Stage to run (preprocess, train, fit_latent, sample, evaluate); 'all' runs "
                  "every stage not done yet. Density tools on a trained workdir: score, "
                  "complete, interpolate (README, Density tools).")
flags.DEFINE_string("inputs", None, "score/complete/interpolate: NIfTI files or folders, "
                    "comma-separated (interpolate: exactly two volumes).")
flags.DEFINE_string("out", None, "score/complete/interpolate: output folder "
                    "(default <workdir>/<mode>).")
flags.DEFINE_string("latent_model", None, "score/complete/interpolate: per_dim, joint or "
                    "rotated (default: score uses every model of the workdir, the others the "
                    "config's latent.model).")
flags.DEFINE_integer("keep_every", 0, "complete: slices 0, K, 2K, ... along the slice axis are "
                     "acquired (a thick-slice scan), the others are completed.")
flags.DEFINE_string("missing", None, "complete: missing slices along the slice axis, e.g. "
                    "'20:30,41' (ranges end-exclusive).")
flags.DEFINE_integer("num_samples", 8, "complete: conditional samples for the std map.")
flags.DEFINE_integer("steps", 8, "interpolate: volumes along the path, endpoints included.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  def body():
    config = FLAGS.config
    try:
      config_lib.validate(config)
    except OSError as e:
      # ml_collections reports a config file it could not load (a wrong path) only
      # when the config is first read, with the file system's answer on the last line.
      reason = str(e).strip().splitlines()[-1].strip()
      raise ConfigError(f"--config: cannot load the config file ({reason})") from e
    parallel.initialize_distributed(config.dist)
    logging.info("JAX %s, %d devices: %s", jax.__version__, jax.device_count(),
                 jax.devices()[0].device_kind)
    options = density_stages.Options(
        inputs=FLAGS.inputs or "", out=FLAGS.out or "", latent_model=FLAGS.latent_model or "",
        keep_every=FLAGS.keep_every, missing=FLAGS.missing or "",
        num_samples=FLAGS.num_samples, steps=FLAGS.steps)
    pipeline.run(config, FLAGS.workdir, FLAGS.mode, density=options)
  run_command(argv, body)


def cli() -> None:
  """The `slicevae` console command (pyproject.toml): the same as python -m slicevae_jax.main."""
  wrapper = sys.modules["__main__"]
  if wrapper is not sys.modules[__name__]:
    # Under the console script, __main__ is pip's wrapper: absl's --help shows the
    # docstring and key flags of __main__ (argv[0]), so lend it this module's.
    wrapper.__doc__ = __doc__
    for name in ("config", "workdir", "mode"):
      FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
