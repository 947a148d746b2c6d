r"""Command line, the only reader of flags: python -m slicevae_jax.main (or `slicevae`).

  slicevae --config=CONFIG --workdir=DIR [--mode=MODE]

Modes: the stages (preprocess, train, fit_latent, sample, evaluate; 'all', the default,
runs every stage not done yet), 'compare' (every model of the config's compare.models on
one data set with one budget, one report; configs/compare.py), 'evaluate_folders'
(another model's NIfTI volumes against real volumes and their labels, with the RAS
segmenter of the workdir), 'export' (a trained workdir -> a model bundle, bundle.py) and
the density tools on a trained workdir, 'score', 'complete' and 'interpolate'
(slicevae/density_stages.py; they read the workdir's stored config):

  slicevae --mode=evaluate_folders --config=configs/hcp64.py --workdir=runs/hcp64 \
      --generated=DIR --real=DIR --labels=DIR --out=DIR [--name=alpha-wgan]
  slicevae --mode=export --config=configs/hcp64.py --workdir=runs/hcp64 --out=DIR
  slicevae --mode=score --config=configs/hcp64.py --workdir=runs/hcp64 --inputs=DIR_OR_FILES

Thin by design: parses flags, starts multi-host JAX when the config asks, and hands over
to `pipeline` or `eval.evaluate`; every mode is callable from Python too. An expected
problem (a bad flag, config value or input file) ends the command with one line,
`error: ...`, on stderr and exit code 2.
"""

import sys
from typing import Callable, NoReturn, Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from slicevae_jax import bundle as bundle_lib
from slicevae_jax import config_lib
from slicevae_jax import logs
from slicevae_jax import parallel
from slicevae_jax import pipeline
from slicevae_jax.errors import ConfigError, SliceVAEError
from slicevae_jax.eval import evaluate as evaluate_lib
from slicevae_jax.slicevae import density_stages

COMMANDS = ("compare", "evaluate_folders", "export") + density_stages.MODES

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/hcp128.py or configs/demo.py:smoke.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for the cache, checkpoints, logs and samples; "
                    "with --mode=evaluate_folders, the workdir whose RAS segmenter scores.")
flags.DEFINE_alias("segmenter_workdir", "workdir")   # evaluate_folders' first spelling
flags.DEFINE_enum("mode", "all", list(pipeline.MODES) + list(COMMANDS),
                  "Stage to run (preprocess, train, fit_latent, sample, evaluate); 'all' runs "
                  "every stage not done yet; 'compare' trains and scores every model of "
                  "compare.models; 'evaluate_folders' scores --generated against --real; "
                  "'export' writes the trained workdir's model bundle to --out; 'score', "
                  "'complete', 'interpolate': the density tools on --inputs.")
flags.DEFINE_string("generated", None, "evaluate_folders: folder of generated .nii/.nii.gz "
                    "volumes.")
flags.DEFINE_string("real", None, "evaluate_folders: folder of real volumes on the same grid.")
flags.DEFINE_string("labels", None, "evaluate_folders: folder of the real volumes' label maps "
                    "(same file names).")
flags.DEFINE_string("out", None, "evaluate_folders: output folder for metrics.json, report.md "
                    "and PNGs; export: the new bundle folder; score/complete/interpolate: "
                    "their output folder (default <workdir>/<mode>).")
flags.DEFINE_string("inputs", None, "score/complete/interpolate: NIfTI files or folders, "
                    "comma-separated (interpolate: exactly two volumes).")
flags.DEFINE_string("latent_model", None, "score/complete/interpolate: per_dim, joint or "
                    "rotated (default: score uses every model of the workdir, the others the "
                    "config's latent.model).")
flags.DEFINE_integer("keep_every", 0, "complete: slices 0, K, 2K, ... along the slice axis are "
                     "acquired (a thick-slice scan), the others are completed.")
flags.DEFINE_string("missing", None, "complete: missing slices along the slice axis, e.g. "
                    "'20:30,41' (ranges end-exclusive).")
flags.DEFINE_integer("num_samples", 8, "complete: conditional samples for the std map.")
flags.DEFINE_integer("steps", 8, "interpolate: volumes along the path, endpoints included.")
flags.DEFINE_string("name", None, "evaluate_folders: model name in the report (default: the "
                    "generated folder's name).")
flags.mark_flags_as_required(["config", "workdir"])

_FOLDER_FLAGS = ("generated", "real", "labels", "out")


def exit_with(err: SliceVAEError) -> NoReturn:
  """Command-line ending for an expected error: one 'error: ...' line on stderr, exit 2.

  The error is also logged when absl writes a log file (--log_dir), so the file says
  why the run stopped; on a terminal the log line would only repeat the error line.
  """
  if getattr(logging.get_absl_handler().python_handler, "stream", sys.stderr) is not sys.stderr:
    logging.error("%s: %s", type(err).__name__, err)
  print(f"error: {err}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """app.run's flags_parser: a flag that cannot be read (unknown key, wrong type) ends the
  command like any other bad input, one 'error: ...' line and exit 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in str(e):
      # A config file that fails to load (an unknown ':variant', a missing file) comes
      # wrapped, traceback and all: keep the flag and the exception's own line.
      flag = lines[0].split(": Error whilst", 1)[0]
      last = lines[-1]
      if last.startswith("slicevae_jax.errors."):
        last = last.split(": ", 1)[-1]
      print(f"error: {flag}: {last}", file=sys.stderr)
    else:
      print(f"error: {e} (see --help)", file=sys.stderr)
  except (AttributeError, KeyError) as e:
    # ml_collections' answer to --config.<key>=... for a key the config lacks; the
    # innermost message names it and suggests the closest.
    inner = e
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    text = " ".join(str(inner).split())
    print(f"error: no such config key {text} (overrides are --config.<key>=<value>)",
          file=sys.stderr)
  sys.exit(2)


def run_command(argv: Sequence[str], body: Callable[[], None]) -> None:
  """No stray arguments, quiet logs (logs.py), and an expected error as `exit_with` ends it."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  logs.configure()
  try:
    body()
  except SliceVAEError as err:
    exit_with(err)


def _config():
  """The validated --config; a file that could not be loaded is a ConfigError."""
  try:
    return config_lib.validate(FLAGS.config)
  except OSError as e:
    # ml_collections reports a config file it could not load (a wrong path) only
    # when the config is first read, with the file system's answer on the last line.
    reason = str(e).strip().splitlines()[-1].strip()
    raise ConfigError(f"--config: cannot load the config file ({reason})") from e


def main(argv):
  def body():
    config = _config()
    mode = FLAGS.mode
    if mode == "evaluate_folders":
      missing = [f"--{name}" for name in _FOLDER_FLAGS if not FLAGS[name].value]
      if missing:
        raise ConfigError(f"--mode=evaluate_folders needs {', '.join(missing)}")
    parallel.initialize_distributed(config.dist)
    logging.info("JAX %s, %d devices: %s", jax.__version__, jax.device_count(),
                 jax.devices()[0].device_kind)
    if mode == "export" and not FLAGS.out:
      raise ConfigError("--mode=export needs --out (the new bundle folder)")
    if mode == "compare":
      pipeline.compare(config, FLAGS.workdir)
    elif mode == "export":
      logging.info("exported %s", bundle_lib.export(FLAGS.workdir, FLAGS.out))
    elif mode in density_stages.MODES:
      density_stages.run_workdir(FLAGS.workdir, mode, density_stages.Options(
          inputs=FLAGS.inputs or "", out=FLAGS.out or "", latent_model=FLAGS.latent_model or "",
          keep_every=FLAGS.keep_every, missing=FLAGS.missing or "",
          num_samples=FLAGS.num_samples, steps=FLAGS.steps))
    elif mode == "evaluate_folders":
      evaluate_lib.evaluate_folders(config, FLAGS.generated, FLAGS.real, FLAGS.labels,
                                    FLAGS.workdir, FLAGS.out, name=FLAGS.name)
    else:
      pipeline.run(config, FLAGS.workdir, mode)
  run_command(argv, body)


def cli(mode: str | None = None) -> None:
  """The `slicevae` console command (pyproject.toml): the same as python -m slicevae_jax.main.

  `mode` is the default --mode of an older entry point (python -m slicevae_jax.compare,
  python -m slicevae_jax.evaluate); a --mode given on the command line still wins.
  """
  if mode is not None:
    sys.argv.insert(1, f"--mode={mode}")
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
