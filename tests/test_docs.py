"""The documentation builds, and what it quotes works when a reader copies it.

README.md and the pages in ``docs/`` quote config files (``configs/x.py``, with
an argument as ``configs/x.py:arg``), detectron2 recipes (``configs/detection/
*.yaml``) and ``python -m module`` commands. A renamed module or config would
otherwise break the reader's first command while the suite stays green, so each
quoted config is loaded, each recipe must exist and each command's module must
run as a main. The site is built with ``mkdocs build --strict``, whose
validation (``mkdocs.yml``) turns a broken link or anchor and a page left out of
the navigation into errors. The README stays short: the details live in
``docs/``.
"""

import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import ml_collections
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
DOCS = os.path.join(REPO, 'docs')
DOC_FILES = [README] + sorted(glob.glob(os.path.join(DOCS, '*.md')))
# Top-level folders of the repository that hold Python modules: a ``python -m``
# command naming one of them must name a module of ours that runs as a main.
PROJECT_PACKAGES = {name for name in os.listdir(REPO)
                    if not name.startswith('.') and glob.glob(os.path.join(REPO, name, '*.py'))}
MAIN_GUARD = re.compile(r"""^if __name__ == ['"]__main__['"]:""", re.MULTILINE)


def _read(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    return f.read()


def _quoted(pattern: str) -> list[tuple[str, ...]]:
  """Every distinct match of ``pattern`` in the README and the docs, as groups."""
  found = set()
  for path in DOC_FILES:
    for match in re.finditer(pattern, _read(path)):
      found.add(match.groups())
  return sorted(found, key=str)


CONFIGS = _quoted(r'\b(configs/[\w/]+\.py)(?::(\w+))?')
RECIPES = [path for (path,) in _quoted(r'\b(configs/detection/[\w.-]+\.ya?ml)\b')]
# ``python -m contrastive.*`` stands for all of them: not a command.
MODULES = sorted({name.rstrip('.') for (name,) in _quoted(r'\bpython3?\s+-m\s+([A-Za-z_][\w.*]*)')
                  if '*' not in name})


def test_the_docs_build_strictly(tmp_path):
  """A broken link or anchor, or a page missing from the nav, fails the build."""
  env = dict(os.environ, NO_MKDOCS_2_WARNING='1')  # the theme's banner, not a warning
  result = subprocess.run(
      [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--config-file',
       os.path.join(REPO, 'mkdocs.yml'), '--site-dir', str(tmp_path / 'site')],
      cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]


def test_every_page_is_in_the_nav():
  import yaml  # pylint: disable=import-outside-toplevel  (comes with mkdocs)
  config = yaml.safe_load(_read(os.path.join(REPO, 'mkdocs.yml')))
  assert config['docs_dir'] == 'docs' and config['theme']['name'] == 'material'

  def pages(nav):
    for entry in nav:
      for value in (entry.values() if isinstance(entry, dict) else [entry]):
        yield from (pages(value) if isinstance(value, list) else [value])

  listed = set(pages(config['nav']))
  assert listed == {os.path.basename(path) for path in DOC_FILES[1:]}


def test_the_readme_is_short():
  lines = _read(README).count('\n')
  assert lines <= 300, f'README.md has {lines} lines; move the details into docs/'


def _anchors(path: str) -> set[str]:
  from markdown.extensions.toc import slugify  # pylint: disable=import-outside-toplevel
  text = re.sub(r'^```.*?^```', '', _read(path), flags=re.MULTILINE | re.DOTALL)
  return {slugify(heading.strip(), '-')
          for heading in re.findall(r'^#+\s+(.*)$', text, flags=re.MULTILINE)}


def test_the_readme_links_to_pages_and_headings_that_exist():
  """mkdocs checks the links between pages; the README is outside the site."""
  for target, anchor in re.findall(r'\]\(([^)#\s]*)(?:#([^)\s]+))?\)', _read(README)):
    if target.startswith(('http://', 'https://')):
      continue
    path = os.path.join(REPO, target) if target else README
    assert os.path.exists(path), f'README.md links to {target}, which does not exist'
    if anchor:
      assert anchor in _anchors(path), f'README.md links to {target}#{anchor}: no such heading'


def test_something_is_quoted():
  assert CONFIGS and RECIPES and MODULES


@pytest.mark.parametrize('path,arg', CONFIGS,
                         ids=[p + (f':{a}' if a else '') for p, a in CONFIGS])
def test_quoted_config_loads(path, arg):
  assert os.path.isfile(os.path.join(REPO, path)), f'{path} is quoted but does not exist'
  torch_before = 'torch' in sys.modules
  module = importlib.import_module(path[:-len('.py')].replace('/', '.'))
  assert isinstance(module.get_config(arg), ml_collections.ConfigDict)
  if not torch_before:
    assert 'torch' not in sys.modules, f'loading {path} imported torch'


@pytest.mark.parametrize('path', RECIPES)
def test_quoted_detection_recipe_exists(path):
  assert os.path.isfile(os.path.join(REPO, path)), f'{path} is quoted but does not exist'


def _find_spec(name: str):
  try:
    return importlib.util.find_spec(name)
  except ModuleNotFoundError:  # a parent package is missing
    return None


@pytest.mark.parametrize('name', MODULES)
def test_quoted_python_m_command_runs_a_main(name):
  spec = _find_spec(name)
  assert spec is not None, f'`python -m {name}` is quoted but {name} does not exist'
  if name.split('.')[0] not in PROJECT_PACKAGES:
    return  # pytest, mkdocs, venv, pip: installed is enough
  if spec.submodule_search_locations is not None:
    assert _find_spec(f'{name}.__main__') is not None, (
        f'`python -m {name}`: the package has no __main__.py')
  else:
    assert MAIN_GUARD.search(_read(spec.origin)), (
        f"`python -m {name}`: {spec.origin} has no `if __name__ == '__main__':`")
