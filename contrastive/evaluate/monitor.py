"""What a pretraining run reports about its backbone: the kNN monitor during
training and, at the end, kNN, offline linear-probe and online-probe top-1.

Features of the labelled 'train' and 'eval' splits come from the method's
backbone (the trainer's encode step, :func:`contrastive.train.make_encode_step`),
BatchNorm in inference mode.
"""

from contrastive import parallel
from contrastive.data import evaluation as eval_data
from contrastive.evaluate import features as features_lib
from contrastive.evaluate import knn
from contrastive.evaluate import linear_probe
from contrastive.evaluate import online_probe


def eval_splits(config, layout, train_block=None) -> dict:
  """The labelled 'train' and 'eval' splits that features are computed on
  (``train_block``: the training images already in memory, not decoded again)."""
  splits = {'train': eval_data.load_split(config.data, 'train', train_block),
            'eval': eval_data.load_split(config.data, 'eval')}
  if splits['train'].num_classes is None:
    raise ValueError('Evaluation needs labels, and the training split has none: set '
                     'config.eval.enabled=False and config.eval.knn_every_epochs=0 '
                     'for an unlabelled dataset.')
  splits['layout'] = layout
  return splits


def split_features(state, encode_step, config, splits, sharded=()) -> dict:
  """(features, labels) of the whole 'train' and 'eval' splits: host numpy on every
  process, or for the splits in ``sharded``, global arrays split along the data
  axis (label -1 on padding), never gathered to one device or host."""
  layout = splits['layout']
  image_shape = (config.data.image_size,) * 2 + (3,)
  return {split: (features_lib.sharded_features if split in sharded else
                  features_lib.extract_features)(
      encode_step, state,
      eval_data.batches(config.data, splits[split], layout.eval_local_batch),
      layout.mesh, layout.eval_local_batch, image_shape) for split in ('train', 'eval')}


def monitor(state, encode_step, probe, config, splits) -> dict:
  """Figures during training: kNN top-1 and the online probe's top-1 on 'eval'. The
  training bank stays split over the devices: at ImageNet scale no host or device
  could hold it at every monitor."""
  features = split_features(state, encode_step, config, splits, sharded=('train',))
  (train_x, train_y), (eval_x, eval_y) = features['train'], features['eval']
  figures = {'monitor/knn_accuracy': knn.knn_accuracy(
      train_x, train_y, eval_x, eval_y, splits['train'].num_classes,
      splits['layout'].mesh, k=config.eval.knn_k, temperature=config.eval.knn_temperature)}
  if probe is not None:
    figures['monitor/online_probe_accuracy'] = online_probe.accuracy(
        probe, parallel.host_copy(state.probe['params']), eval_x, eval_y)
  return figures


def evaluate(encoders: dict, encode_step, config, splits, probe=None) -> dict:
  """kNN and offline linear-probe top-1 on the eval split for each encoder state,
  and the online probe's top-1 for the 'trained' one (the only one it trained on).
  The linear probe trains on host features, so the training features are gathered
  to every host here (and split over the devices again for the kNN)."""
  num_classes = splits['train'].num_classes
  results = {}
  for name, state in encoders.items():
    features = split_features(state, encode_step, config, splits)
    (train_x, train_y), (eval_x, eval_y) = features['train'], features['eval']
    offline = linear_probe.train_linear_probe(
        train_x, train_y, num_classes, epochs=config.eval.probe_epochs,
        learning_rate=config.eval.probe_learning_rate, seed=config.seed)
    results[name] = {
        'knn_accuracy': knn.knn_accuracy(
            train_x, train_y, eval_x, eval_y, num_classes, splits['layout'].mesh,
            k=config.eval.knn_k, temperature=config.eval.knn_temperature),
        'linear_probe_accuracy': linear_probe.probe_accuracy(offline, eval_x, eval_y),
    }
    if probe is not None and name == 'trained':
      results[name]['online_probe_accuracy'] = online_probe.accuracy(
          probe, parallel.host_copy(state.probe['params']), eval_x, eval_y)
  return results


def format_results(results: dict, config) -> str:
  lines = [f'Evaluation on the held-out split ({config.eval.knn_k}-NN, temperature '
           f'{config.eval.knn_temperature}; linear probe {config.eval.probe_epochs} '
           'epochs):',
           f'  {"encoder":<16}{"kNN top-1":>12}{"linear top-1":>15}{"online probe":>15}']
  for name, figures in results.items():
    online = figures.get('online_probe_accuracy')
    lines.append(f'  {name:<16}{100 * figures["knn_accuracy"]:>11.2f}%'
                 f'{100 * figures["linear_probe_accuracy"]:>14.2f}%'
                 + ('' if online is None else f'{100 * online:>14.2f}%'))
  return '\n'.join(lines)
