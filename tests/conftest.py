"""Every test sees 8 simulated CPU devices (set before JAX is imported) and no Triton."""

import os

# The tests' programs are tiny and compiled once each: compiling them without
# LLVM's optimisations saves about a fifth of the suite's time. Results may move
# in their last bits, which the tolerances scaled to each tensor absorb
# (tests/tolerances.py).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

# Triton loaded into a process that has loaded TensorFlow crashes it (their LLVM
# builds clash). torch imports Triton, where installed, the first time anything
# touches torch._dynamo, which every torch optimizer's constructor does. Nothing
# in the suite compiles for a GPU: its processes see no Triton at all.
sys.modules.setdefault('triton', None)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests compile the same tiny train step (each run builds its own jitted
# functions, so JAX's in-memory caches do not carry over). A compilation cache
# for this pytest process only lets later identical programs skip XLA.
jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='jax-cache-'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


# The longest tests, started first so that the two workers of ``-n 2`` do not
# wait on one of them at the end (a test left out here only runs later).
_LONGEST_FIRST = (
    'tests/test_trainer.py::test_two_processes_match_one_process',
    'tests/test_transfer.py::test_fine_tunes_the_exported_backbone_and_evaluates',
    'tests/test_robustness.py::test_sigterm_saves_the_step_in_flight',
    'tests/test_cmc.py::test_a_killed_run_resumes',
    'tests/test_cpc_amdim_runs.py::test_a_killed_run_resumes',
    'tests/test_byol_moco_v3.py::test_killed_run_resumes',
    'tests/test_vit_runs.py::test_a_killed_vit_run_resumes',
    'tests/test_new_method_and_encoder.py::test_it_trains',
    'tests/test_train_step.py::test_online_probe_and_local_bn',
    'tests/test_custom_method.py::test_a_method_defined_here_trains',
    'tests/test_simclr_v2.py::test_resumed_run_with_the_queue',
    'tests/test_trainer.py::test_resumed_run_reproduces_uninterrupted_run',
    'tests/test_trainer.py::test_image_folder_run_trains_and_evaluates',
    'tests/test_trainer.py::test_streamed_run_resumed_mid_epoch',
)


def pytest_collection_modifyitems(items):
  def rank(item):
    for position, prefix in enumerate(_LONGEST_FIRST):
      if item.nodeid.startswith(prefix):
        return position
    return len(_LONGEST_FIRST)
  items.sort(key=rank)     # stable: the rest keep their order


def tiny_config():
  """The quickstart recipe shrunk to a few seconds a run."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.global_batch_size = 16
  config.num_epochs = 0.1
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1000     # only the final save; tests that resume set it
  config.model.name = 'resnet10'
  config.model.width = 0.0625
  config.head.out_dim = 16
  config.data.image_size = 16
  config.eval.enabled = False
  config.eval.batch_size = 64
  config.eval.probe_epochs = 5
  return config


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope='session')
def pretrained_workdir(tmp_path_factory):
  """One tiny real pretraining run (SimCLR, 8 devices), shared by the tests that
  read a finished workdir: compiling its train step takes most of a minute."""
  from contrastive import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  train.train_and_evaluate(tiny_config(), workdir)
  return workdir
