"""Packaging: one list of dependencies, the `slicevae` command, licence and citation files.

The install itself (a fresh venv, `pip install .`, `slicevae --help`, the smoke config) is
too slow for the suite; these check that the files that make it work stay consistent.
"""

import ast
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    return f.read()


def test_dependencies_live_in_pyproject_and_requirements_installs_the_package():
  project = tomllib.loads(_read("pyproject.toml"))["project"]
  names = {d.split(">")[0].split("<")[0].split("=")[0].strip().lower()
           for d in project["dependencies"]}
  assert {"jax", "flax", "orbax-checkpoint", "nibabel", "absl-py"} <= names
  lines = [l.strip() for l in _read("requirements.txt").splitlines()
           if l.strip() and not l.startswith("#")]
  assert lines == ["-e ."]
  assert "-r requirements.txt" in _read("requirements-test.txt")


def test_console_command_points_at_main_cli():
  project = tomllib.loads(_read("pyproject.toml"))["project"]
  module, func = project["scripts"]["slicevae"].split(":")
  assert module == "slicevae_jax.main"
  tree = ast.parse(_read(os.path.join("slicevae_jax", "main.py")))
  assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_licence_and_citation():
  assert "Apache License" in _read("LICENSE") and "END OF TERMS AND CONDITIONS" in _read("LICENSE")
  # Text checks (no YAML parser among the dependencies); `cffconvert --validate` checks the schema.
  cff = _read("CITATION.cff")
  assert cff.startswith("cff-version: 1.2.0") and "preferred-citation:" in cff
  assert 'title: "Modelling the Distribution of 3D Brain MRI using a 2D Slice VAE"' in cff
  assert "family-names: Volokitin" in cff and "doi: 10.1007/978-3-030-59728-3_64" in cff
