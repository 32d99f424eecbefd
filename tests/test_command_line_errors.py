"""A broken config file, a field no schema has and a JAX platform the machine
lacks: each is one line on stderr, naming what to fix, and exit status 1."""

import importlib
import os
import re
import subprocess
import sys

import pytest

from contrastive import command_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ('from contrastive.config import base_config, downstream_config\n'
          'from contrastive.data import augment_config\n\n\n')      # 4 lines
RAISES = HEADER + ('def get_config(arg=None):\n'
                   '  config = base_config()\n'
                   '  config.optim.base_lr = 1 / 0\n'                 # line 7
                   '  return config\n')

# (the file, the argument after its name, the start of the one line expected)
BROKEN = {
    'syntax error': (HEADER + 'def get_config(arg=None):\n  return base_config(\n', '',
                     '{path}:6: SyntaxError: '),
    'get_config raises': (RAISES, '', '{path}:7: ZeroDivisionError: division by zero'),
    'import fails': ('from contrastive.confg import base_config\n', '',
                     "{path}:1: ModuleNotFoundError: No module named 'contrastive.confg'"),
    'no get_config': (HEADER + 'CONFIG = base_config()\n', '',
                      '{path}: defines no get_config(); a config file ends with'),
    'returns nothing': (HEADER + 'def get_config(arg=None):\n  base_config()\n', '',
                        '{path}: get_config() returned a NoneType, not the ConfigDict'),
    'argument refused': (HEADER + 'def get_config(arg=None):\n'
                         "  if arg != 'small':\n"
                         "    raise ValueError(f'{arg!r}; valid: small')\n", ':large',
                         "{path}:7: ValueError: 'large'; valid: small"),
    'argument not taken': (HEADER + 'def get_config():\n  return base_config()\n', ':large',
                           '{path}: TypeError: get_config() takes 0 positional arguments'),
    'no such file': (None, '', '{path}: no such config file'),
}


def _write(tmp_path, source) -> str:
  path = tmp_path / 'experiment.py'
  if source is not None:
    path.write_text(source)
  return str(path)


@pytest.mark.parametrize('case', BROKEN)
def test_a_broken_config_file_is_one_line_naming_the_file_and_line(tmp_path, case):
  source, arg, expected = BROKEN[case]
  path = _write(tmp_path, source)
  with pytest.raises(command_line.ConfigFileError) as error:
    command_line.load_config_file(path + arg)
  assert str(error.value).startswith(expected.format(path=path))
  assert '\n' not in str(error.value)


# (lines of get_config after config = base_config(), the error expected)
UNKNOWN = [
    (['config.optim.weight_decy = 1e-4'],
     '{path}:7: config.optim.weight_decy is not a config field (did you mean '
     'config.optim.weight_decay?). contrastive/config.py has every field.'),
    # A section replaced by a recipe's, then a field of it misspelt.
    (['config.aug = augment_config.moco_augment_config(version=2)',
      'config.aug.blur_prb = 0.0'],
     '{path}:8: config.aug.blur_prb is not a config field (did you mean config.aug.blur_prob?)'),
    # A name valid in another section; one close to nothing; both listed.
    (['config.simclr.temperature = 0.5', "config['zzz'] = 1", 'config.optim.temperature = 0.1'],
     '{path}:9: config.optim.temperature is not a config field; {path}:8: config.zzz is not a '
     'config field. contrastive/config.py has every field.'),
    (['config = downstream_config()', 'config.optim.nesterv = True'],
     '{path}:8: config.optim.nesterv is not a config field (did you mean config.optim.nesterov?)'),
]


@pytest.mark.parametrize('lines,expected', UNKNOWN,
                         ids=['typo', 'replaced section', 'two fields', 'downstream'])
def test_a_field_the_schema_lacks_is_named_with_its_line(tmp_path, lines, expected):
  source = HEADER + 'def get_config(arg=None):\n  config = base_config()\n' + ''.join(
      f'  {line}\n' for line in lines) + '  return config\n'
  path = _write(tmp_path, source)
  with pytest.raises(command_line.ConfigFileError) as error:
    command_line.load_config_file(path)
  assert str(error.value).startswith(expected.format(path=path))


def test_every_experiment_file_loads():
  names = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, 'configs'))
                 if name.endswith('.py') and not name.endswith('_study.py'))
  for name in names:
    for arg in (None, *getattr(importlib.import_module(f'configs.{name}'), 'ARGS', ())):
      path = os.path.join(REPO, 'configs', f'{name}.py') + (f':{arg}' if arg else '')
      command_line.load_config_file(path)             # raises on any problem


def _run_together(*commands):
  """(exit status, stdout, stderr) of each ``(module and flags, environment)``, the
  processes started together: each spends seconds importing before it fails."""
  started = [subprocess.Popen(
      [sys.executable, '-m', *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO, **env))
             for args, env in commands]
  results = []
  for process in started:
    stdout, stderr = process.communicate(timeout=300)
    results.append((process.returncode, stdout, stderr))
  return results


def test_the_command_says_it_in_one_line_and_the_traceback_on_request(tmp_path):
  (tmp_path / 'broken.py').write_text(RAISES)
  main = ['contrastive.main', f'--config={tmp_path}/broken.py', f'--workdir={tmp_path}/run']
  quiet, verbose = _run_together((main, {}), (main + ['--verbosity=1'], {}))
  line = r'error: \S+/broken\.py:7: ZeroDivisionError: division by zero'
  hint = r' \(rerun with --verbosity=1 for the traceback\)'
  status, _, stderr = quiet
  assert status == 1 and re.fullmatch(line + hint + '\n', stderr), stderr
  status, _, stderr = verbose
  assert status == 1 and stderr.startswith('Traceback'), stderr
  assert '1 / 0' in stderr                                      # the file's own line
  assert re.fullmatch(line + '\n', stderr.splitlines(keepends=True)[-1])


def test_a_platform_the_machine_lacks_is_one_line_listing_those_it_has(tmp_path):
  results = _run_together(
      (['contrastive.main', '--config=configs/quickstart.py', f'--workdir={tmp_path}/run'],
       {'JAX_PLATFORMS': 'cuda'}),
      (['contrastive.plots', f'--workdir={tmp_path}/run'], {'JAX_PLATFORMS': 'tpu'}))
  for platform, (status, stdout, stderr) in zip(('cuda', 'tpu'), results):
    assert status == 1 and stdout == '', stderr
    assert stderr.startswith(f'error: JAX_PLATFORMS={platform}: JAX cannot start it here (')
    assert 'this machine has: cpu' in stderr and 'Unset JAX_PLATFORMS' in stderr
    assert stderr.count('\n') == 1
