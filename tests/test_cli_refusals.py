"""What export, plots and downstream refuse, each in one line before any work:
an --out that exists, is a folder or has no folder; a folder the pictures
cannot go into; a downstream workdir that holds a pretraining run. And an
export killed mid-write leaves the previous file whole."""

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading

import flax.serialization
import pytest

from configs import linear_eval_moco
from contrastive import downstream
from contrastive import export
from contrastive import plots
from contrastive import reader
from tests.remote_fs import fake_gcs, remote_fs  # noqa: F401  pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_reading(*args, **kwargs):
  raise AssertionError('the checkpoint was read before --out was checked')


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize('format_', export.FORMATS)
def test_export_refuses_a_wrong_out_before_reading(format_, tmp_path, monkeypatch):
  monkeypatch.setattr(reader, 'load_pretrained', _no_reading)
  exporter = export.EXPORTERS[format_]
  existing = tmp_path / 'existing'
  existing.write_bytes(b'previous')
  with pytest.raises(ValueError, match=re.escape(f'--out={existing} exists: pass --overwrite')):
    exporter('W', str(existing))
  assert existing.read_bytes() == b'previous'
  with pytest.raises(ValueError, match=re.escape(f'--out={tmp_path} is a directory')):
    exporter('W', str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f'the folder {tmp_path / "nope"} does not exist')):
    exporter('W', str(tmp_path / 'nope' / 'file'))
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f'the folder {existing} is not a directory')):
    exporter('W', str(existing / 'file'))
  if format_ != 'timm':      # which takes no head layers at all
    with pytest.raises(ValueError, match='--head_layers=-1: give 0'):
      exporter('W', str(tmp_path / 'new'), head_layers=-1)


def test_export_overwrites_when_told_and_never_half(pretrained_workdir, tmp_path, monkeypatch):
  target = tmp_path / 'encoder.msgpack'
  target.write_bytes(b'previous')
  out = tmp_path / 'latest.msgpack'
  out.symlink_to(target)
  export.export_flax(pretrained_workdir, str(out), overwrite=True)
  assert out.is_symlink()                 # the link stays, its file is replaced
  _, variables = export.load_flax_encoder(str(target))
  assert variables['params']
  files = sorted(os.listdir(tmp_path))
  assert files == ['encoder.msgpack', 'latest.msgpack']       # nothing left beside them

  # A full disk at the last moment: the previous file stays, the error is one line.
  def full(_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  target.write_bytes(b'previous')
  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(ValueError,
                     match=re.escape(f'--out={out} cannot be written: No space left')):
    export.export_flax(pretrained_workdir, str(out), overwrite=True)
  assert target.read_bytes() == b'previous'
  assert sorted(os.listdir(tmp_path)) == files


def test_export_writes_into_a_file_that_is_not_regular(pretrained_workdir, tmp_path):
  """A device or a pipe given as --out is written, not replaced by a rename."""
  pipe = tmp_path / 'pipe'
  os.mkfifo(pipe)
  received = []
  reading = threading.Thread(target=lambda: received.append(pipe.read_bytes()))
  reading.start()
  try:
    export.export_flax(pretrained_workdir, str(pipe), overwrite=True)
  finally:
    if reading.is_alive():      # the export failed before opening it: end the reader
      os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    reading.join(10)
  assert stat.S_ISFIFO(os.stat(pipe).st_mode)
  assert flax.serialization.msgpack_restore(received[0])['format'] == 'contrastive.flax_encoder'


def test_export_to_a_bucket_refuses_an_existing_object(  # pylint: disable=redefined-outer-name
    pretrained_workdir, remote_fs):
  url = f'{remote_fs.url}/encoder.msgpack'
  export.export_flax(pretrained_workdir, url)
  with pytest.raises(ValueError, match=re.escape(f'--out={url} exists')):
    export.export_flax(pretrained_workdir, url)
  export.export_flax(pretrained_workdir, url, overwrite=True)
  assert remote_fs.object_names() == ['encoder.msgpack']


def test_a_killed_export_leaves_the_previous_file(pretrained_workdir, tmp_path):
  """The process is killed mid-write: by SIGXFSZ, past a file size limit (Python
  ignores the signal unless told otherwise)."""
  out = tmp_path / 'resnet.safetensors'
  out.write_bytes(b'previous')
  script = f"""
import resource, signal, sys
from contrastive import export
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
sys.argv = ['export', '--workdir={pretrained_workdir}', '--format=torchvision',
            '--out={out}', '--overwrite']
export.main()
"""
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, check=False)
  assert result.returncode == -signal.SIGXFSZ, result.stderr[-3000:]
  assert out.read_bytes() == b'previous'


# ----------------------------------------------------------------------------- plots

def test_pictures_go_into_out_dir_after_checks(pretrained_workdir, tmp_path):
  folder = tmp_path / 'pictures' / 'new'
  written = plots.write_pictures(pretrained_workdir, ['curves'], out_dir=str(folder))
  assert written == [str(folder / 'training_curves.png')]
  assert (folder / 'training_curves.png').read_bytes().startswith(b'\x89PNG')
  # Counts are refused before the curves are drawn.
  for counts, flag in [({'k': 0}, '--k=0'), ({'num_queries': -1}, '--num_queries=-1')]:
    with pytest.raises(ValueError, match=f'{flag}: retrievals need at least 1'):
      plots.write_pictures(pretrained_workdir, out_dir=str(tmp_path / 'none'), **counts)
  assert not (tmp_path / 'none' / 'training_curves.png').exists()
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  with pytest.raises(ValueError, match=re.escape(f'--out_dir={a_file} is a file')):
    plots.write_pictures(pretrained_workdir, out_dir=str(a_file))
  with pytest.raises(ValueError, match=re.escape(
      f'--out_dir={a_file / "sub"} is not writable (Not a directory): write the pictures '
      'into another folder with --out_dir=DIR.')):
    plots.write_pictures(pretrained_workdir, out_dir=str(a_file / 'sub'))


def test_plots_of_a_read_only_workdir_say_so_in_one_line(pretrained_workdir, tmp_path):
  prefix = []
  if os.geteuid() == 0:      # root writes into read-only folders: drop that capability
    if not shutil.which('setpriv'):
      pytest.skip('needs setpriv to run as root without CAP_DAC_OVERRIDE')
    prefix = ['setpriv', '--inh-caps=-dac_override', '--bounding-set=-dac_override']
  workdir = tmp_path / 'read_only'
  workdir.mkdir()
  shutil.copy(os.path.join(pretrained_workdir, 'metrics.jsonl'), workdir)
  workdir.chmod(0o555)
  try:
    result = subprocess.run([*prefix, sys.executable, '-m', 'contrastive.plots',
                             f'--workdir={workdir}', '--what=curves'],
                            cwd=REPO, capture_output=True, text=True, check=False)
  finally:
    workdir.chmod(0o755)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.startswith(
      f'error: the workdir {workdir} is not writable (Permission denied): write the '
      'pictures into another folder with --out_dir=DIR.\n'), result.stderr
  assert os.listdir(workdir) == ['metrics.jsonl']


# ----------------------------------------------------------------------------- downstream

def test_downstream_refuses_a_workdir_that_holds_a_pretraining_run(pretrained_workdir,
                                                                   tmp_path):
  before = {name: os.path.getmtime(os.path.join(pretrained_workdir, name))
            for name in os.listdir(pretrained_workdir)}
  config = linear_eval_moco.get_config()
  config.pretrained = pretrained_workdir
  link = tmp_path / 'link'
  link.symlink_to(pretrained_workdir)
  for workdir in (pretrained_workdir, f'{pretrained_workdir}/', str(link)):
    with pytest.raises(ValueError, match=re.escape(
        f'--workdir={workdir} is config.pretrained={pretrained_workdir!r}: the downstream '
        f'workdir must differ from config.pretrained (e.g. --workdir={pretrained_workdir}'
        '_linear).')):
      downstream.train_and_evaluate(config, workdir)
  other = tmp_path / 'other_run'
  other.mkdir()
  shutil.copy(os.path.join(pretrained_workdir, 'config.json'), other)
  with pytest.raises(ValueError, match=re.escape(f'--workdir={other} holds a pretraining run')):
    downstream.train_and_evaluate(config, str(other))
  assert os.listdir(other) == ['config.json']
  assert before == {name: os.path.getmtime(os.path.join(pretrained_workdir, name))
                    for name in os.listdir(pretrained_workdir)}
  # A URL is compared as it is written, without reaching the bucket.
  config.pretrained = 'gs://bucket/run'
  with pytest.raises(ValueError, match='must differ from config.pretrained'):
    downstream._check_workdir('gs://bucket/run/', config)  # pylint: disable=protected-access
