"""A simulated kill for the resume tests."""

import contextlib

import pytest


@contextlib.contextmanager
def killed_at_step(monkeypatch, data_class, step: int):
  """Inside, a run stops as a kill would when it draws ``data_class``'s batch of
  ``step`` (``KeyboardInterrupt``, expected here); the checkpoints saved before
  it stay, and the batches are real again after."""
  real_batch = data_class.batch

  def batch_or_die(self, at):
    if at == step:
      raise KeyboardInterrupt('simulated kill')
    return real_batch(self, at)

  monkeypatch.setattr(data_class, 'batch', batch_or_die)
  try:
    with pytest.raises(KeyboardInterrupt):
      yield
  finally:
    monkeypatch.setattr(data_class, 'batch', real_batch)
