"""Command line: python -m slicevae_jax.main --config=configs/demo.py --workdir=runs/demo.

Thin by design: parses flags, starts multi-host JAX when the config asks, and
hands over to `pipeline.run`. Every stage is callable from Python too.
"""


import jax
from absl import app, flags, logging
from ml_collections import config_flags

from slicevae_jax import config_lib
from slicevae_jax import parallel
from slicevae_jax import pipeline
from slicevae_jax.errors import run_command

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/hcp128.py or configs/demo.py:smoke.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for the cache, checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "all", list(config_lib.MODES),
                  "Stage to run (preprocess, train, fit_latent, sample, evaluate); 'all' runs "
                  "every stage not done yet.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  def body():
    config = FLAGS.config
    config_lib.validate(config)
    parallel.initialize_distributed(config.dist)
    logging.info("JAX %s, %d devices: %s", jax.__version__, jax.device_count(),
                 jax.devices()[0].device_kind)
    pipeline.run(config, FLAGS.workdir, FLAGS.mode)
  run_command(argv, body)


if __name__ == "__main__":
  app.run(main)
