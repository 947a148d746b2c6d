"""The package's layout: no import circle (function bodies included), modules that say where
they sit, the notebook functions under tab completion, the old documented paths still there."""

import ast
import os

import slicevae_jax

PACKAGE = os.path.dirname(os.path.abspath(slicevae_jax.__file__))
ROOT = os.path.dirname(PACKAGE)
# Above this a module must be one cohesive thing and say so in its first line.
MAX_LINES = 500


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = path
  return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
  """The package modules `path` imports anywhere in its text: top level, function bodies,
  `if __name__ == '__main__'` blocks alike."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from a.b import c`: the module a.b.c if there is one, else a.b itself.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    else:
      continue
    out.update(n for n in names if n in modules)
  return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle of `graph` as a path [a, b, ..., a], or None."""
  state: dict[str, int] = {}   # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_circle_function_bodies_included():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))
  # The check itself finds a circle hidden in a function body.
  assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_every_module_says_where_it_sits_and_long_ones_why():
  for name, path in _modules().items():
    with open(path, encoding="utf-8") as f:
      text = f.read()
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.splitlines()[0].strip(), f"{name}: no first line saying where it sits"
    lines = text.count("\n")
    if lines > MAX_LINES:
      assert "one cohesive" in doc.splitlines()[0], f"{name}: {lines} lines"


def test_notebook_functions_under_tab_completion():
  listed = dir(slicevae_jax)
  for name in ("load_for_inference", "sample_volumes", "encode_stacks", "decode_latents",
               "sample_latents", "load_baseline", "run"):
    assert name in listed, name
  assert callable(slicevae_jax.load_for_inference)


def test_paths_the_readme_documented_still_import():
  # pylint: disable=import-outside-toplevel
  from slicevae_jax import baseline_stages, evaluate, latent_gaussian
  from slicevae_jax.eval import evaluate as evaluate_lib, report
  from slicevae_jax.slicevae import latent
  assert evaluate.evaluate_volumes is evaluate_lib.evaluate_volumes
  assert evaluate.write_report is report.write_report
  assert latent_gaussian.fit is latent.fit and latent_gaussian.conditional_sample
  assert callable(baseline_stages.sample_volumes)
  assert os.path.exists(os.path.join(PACKAGE, "compare.py"))   # python -m slicevae_jax.compare
