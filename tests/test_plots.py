"""Pictures of a run: both PNGs are written, and retrievals are the true top-k."""

import numpy as np

from contrastive import plots

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _assert_png(path, min_bytes=10_000):
  with open(path, 'rb') as f:
    content = f.read()
  assert content.startswith(PNG_SIGNATURE)
  assert len(content) >= min_bytes
  width, height = (int.from_bytes(content[16 + 4 * i:20 + 4 * i], 'big') for i in range(2))
  assert width >= 300 and height >= 300


def test_training_curves_png(pretrained_workdir, tmp_path):
  path = plots.plot_training_curves(pretrained_workdir, str(tmp_path / 'curves.png'))
  _assert_png(path)


def test_retrievals_png(pretrained_workdir, tmp_path):
  path = plots.plot_retrievals(pretrained_workdir, str(tmp_path / 'retrievals.png'),
                               num_queries=4, k=5)
  _assert_png(path)


def test_curve_panels_pick_what_the_run_logged():
  records = {
      10: {'step': 10, 'loss': 4.0, 'learning_rate': 0.1, 'epoch': 1.0, 'grad_norm': 2.0},
      20: {'step': 20, 'loss': 3.0, 'learning_rate': 0.2, 'epoch': 2.0,
           'monitor/knn_accuracy': 0.4, 'monitor/online_probe_accuracy': 0.5},
      30: {'step': 30, 'trained/knn_accuracy': 0.6},
  }
  panels = plots.curve_panels(records)
  assert list(panels) == ['loss', 'learning rate', 'accuracy']
  np.testing.assert_allclose(panels['loss']['loss'][0], [1.0, 2.0])     # epochs
  assert set(panels['accuracy']) == {'monitor/knn_accuracy', 'monitor/online_probe_accuracy',
                                     'trained/knn_accuracy'}
  x, y = panels['accuracy']['trained/knn_accuracy']
  np.testing.assert_allclose(x, [3.0])      # a step without an epoch gets one
  np.testing.assert_allclose(y, [0.6])
  # Without epochs the x axis is in steps, and missing panels are left out.
  steps_only = plots.curve_panels({5: {'step': 5, 'loss': 1.0}})
  assert list(steps_only) == ['loss']
  np.testing.assert_allclose(steps_only['loss']['loss'][0], [5.0])


def test_nearest_neighbours_are_the_top_k_by_cosine_similarity():
  rng = np.random.default_rng(0)
  gallery = rng.normal(size=(50, 6))
  # Scaling a row changes its dot products but not its cosine similarity.
  gallery[::3] *= rng.uniform(0.1, 10.0, size=(17, 1))
  queries = rng.normal(size=(4, 6))
  indices, similarities = plots.nearest_neighbours(queries, gallery, k=7)
  assert indices.shape == similarities.shape == (4, 7)
  for q in range(4):
    cosine = gallery @ queries[q] / (np.linalg.norm(gallery, axis=1) *
                                     np.linalg.norm(queries[q]))
    np.testing.assert_array_equal(indices[q], np.argsort(-cosine)[:7])
    np.testing.assert_allclose(similarities[q], np.sort(cosine)[::-1][:7])
  # A query equal to a gallery row finds that row first, with similarity 1.
  indices, similarities = plots.nearest_neighbours(gallery[[12]] * 5.0, gallery, k=3)
  assert indices[0, 0] == 12
  np.testing.assert_allclose(similarities[0, 0], 1.0)
  # k beyond the gallery size returns the whole gallery.
  assert plots.nearest_neighbours(queries, gallery[:3], k=10)[0].shape == (4, 3)
