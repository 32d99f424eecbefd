"""The import structure: the config schema loads without JAX or TensorFlow, and the
modules of ``contrastive.data`` import each other without a cycle."""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, 'contrastive', 'data')
PACKAGE = 'contrastive.data'


def test_config_imports_neither_jax_nor_tensorflow():
  """Experiment files and command-line tools read configs on hosts that may have
  neither installed, and without paying for their import."""
  code = ('import sys\n'
          'import contrastive.config\n'
          'loaded = sorted({"jax", "tensorflow"} & set(sys.modules))\n'
          'assert not loaded, f"importing contrastive.config imported {loaded}"\n'
          'contrastive.config.base_config()\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def _imported_modules(path: str, modules: set[str]) -> set[str]:
  """The modules of ``modules`` that the file imports anywhere, at the top or
  inside a function, absolutely or relatively."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read(), path)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = PACKAGE if node.level else node.module or ''
      if node.level and node.module:
        base = f'{PACKAGE}.{node.module}'
      names = [base] + [f'{base}.{alias.name}' for alias in node.names]
    else:
      continue
    for name in names:
      if name.startswith(PACKAGE + '.'):
        module = name[len(PACKAGE) + 1:].split('.')[0]
        if module in modules:
          found.add(module)
  return found


def _import_graph() -> dict[str, set[str]]:
  modules = {name[:-3] for name in os.listdir(DATA)
             if name.endswith('.py') and name != '__init__.py'}
  return {module: _imported_modules(os.path.join(DATA, module + '.py'), modules) - {module}
          for module in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle through each back edge met by a depth-first search (empty iff the
  graph is acyclic)."""
  cycles, done, path = [], set(), []

  def visit(module):
    path.append(module)
    for imported in sorted(graph[module]):
      if imported in path:
        cycles.append(path[path.index(imported):] + [imported])
      elif imported not in done:
        visit(imported)
    path.pop()
    done.add(module)

  for module in sorted(graph):
    if module not in done:
      visit(module)
  return cycles


def test_the_cycle_search_finds_cycles():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}, 'e': set()}
  assert _cycles(graph) == [['a', 'b', 'c', 'a']]
  assert _cycles({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) == []


def test_data_modules_import_each_other_without_cycles():
  """Imports inside functions count too: a lazy import that only dodges a cycle
  still ties the two modules together."""
  graph = _import_graph()
  assert {'sources', 'pipeline', 'evaluation'} <= set(graph)
  cycles = _cycles(graph)
  assert not cycles, 'import cycles in contrastive/data: ' + '; '.join(
      ' -> '.join(cycle) for cycle in cycles)
