r"""The PyTorch reference of our SimCLR train step, timed on synthetic views.

    # CPU, fp32:
    python benchmarks/torch_reference.py --model resnet18 --stem cifar --image_size 32 \
        --batch 256 --precision fp32 --device cpu --steps 3 --warmup 1 --threads 2
    # GPU, bf16 autocast, channels-last, torch.compile:
    python benchmarks/torch_reference.py --model resnet50 --stem imagenet --image_size 224 \
        --batch 256 --precision bf16 --channels_last --compile --device cuda --json /tmp/torch.json
    # Only the parameter count (no timing), for comparison with the JAX model's:
    python benchmarks/torch_reference.py --model resnet50 --width 0.5 --check

It runs in its own interpreter and imports nothing from ``contrastive``, so that
``benchmarks/step.py`` can run it as a subprocess and divide its own step time by
this one. The network is ours, rebuilt layer for layer (``contrastive/models``):
ResNet v1, the SimCLR v1 projection head (2 layers, hidden width = feature width,
128 out, last BN without centring), the same trainable parameters; the loss is
``losses.nt_xent`` and the optimisers are ``optim.make_optimizer``'s SGD and LARS
with ``base_config``'s hyperparameters. One step: both views as one batch through
the network (BN in training mode, over both), the loss, the backward pass and the
update. Augmentation is not part of it: the two views are random, normalised
float batches already on the device, like our synthetic-input benchmark.

Reported (one line, and with ``--json`` a file): the mean time of ``--steps``
steps after ``--warmup`` ones, timed apart (the first of them as
``compile_seconds``: torch.compile compiles there); ``images_per_second`` =
``batch / step_seconds``, each image counted once, not once per view; the peak
CUDA memory of the timed steps; the last step's loss. If ``--compile`` fails (no
compiler on the machine, say) or its warmup outlasts ``--compile_seconds``, the
step runs eagerly and the report says ``compiled: false`` with the reason.
"""

import argparse
import json
import platform
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# base_config's values; flax's BN momentum 0.9 is torch's 0.1 (the new batch's weight).
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5
HEAD_LAYERS = 2
HEAD_OUT_DIM = 128
BASE_LR = 0.3                  # x batch / 256 ('linear' scaling)
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-6
TRUST_COEFFICIENT = 1e-3


def lecun_normal_(weight):
  """Flax's default kernel initialiser, so that losses start where ours do."""
  std = (weight[0].numel() ** -0.5) / .87962566103423978
  nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def conv(cin, cout, kernel, stride=1):
  layer = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
  lecun_normal_(layer.weight)
  return layer


def batch_norm(channels, zero_scale=False):
  layer = nn.BatchNorm2d(channels, eps=BN_EPSILON, momentum=BN_MOMENTUM)
  if zero_scale:
    nn.init.zeros_(layer.weight)
  return layer


class BasicBlock(nn.Module):
  """Two 3x3 convolutions, the last BN zero-initialised; ResNet-10/18/34."""
  expansion = 1

  def __init__(self, cin, filters, stride):
    super().__init__()
    self.body = nn.Sequential(
        conv(cin, filters, 3, stride), batch_norm(filters), nn.ReLU(inplace=True),
        conv(filters, filters, 3), batch_norm(filters, zero_scale=True))
    self.shortcut = projection(cin, filters, stride)

  def forward(self, x):
    return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion; ResNet-50 and deeper."""
  expansion = 4

  def __init__(self, cin, filters, stride):
    super().__init__()
    self.body = nn.Sequential(
        conv(cin, filters, 1), batch_norm(filters), nn.ReLU(inplace=True),
        conv(filters, filters, 3, stride), batch_norm(filters), nn.ReLU(inplace=True),
        conv(filters, filters * 4, 1), batch_norm(filters * 4, zero_scale=True))
    self.shortcut = projection(cin, filters * 4, stride)

  def forward(self, x):
    return F.relu(self.body(x) + self.shortcut(x))


def projection(cin, cout, stride):
  """Ours projects the residual whenever its shape changes."""
  if stride == 1 and cin == cout:
    return nn.Identity()
  return nn.Sequential(conv(cin, cout, 1, stride), batch_norm(cout))


# contrastive.models.resnet.ARCHITECTURES again, on purpose: this interpreter imports
# torch only. --check and benchmarks.step's parameter counts catch any drift.
ARCHITECTURES = {
    'resnet10': ((1, 1, 1, 1), BasicBlock),
    'resnet18': ((2, 2, 2, 2), BasicBlock),
    'resnet34': ((3, 4, 6, 3), BasicBlock),
    'resnet50': ((3, 4, 6, 3), Bottleneck),
    'resnet101': ((3, 4, 23, 3), Bottleneck),
    'resnet152': ((3, 8, 36, 3), Bottleneck),
}


class ResNet(nn.Module):
  """ResNet v1 trunk returning globally average-pooled features."""

  def __init__(self, name, width, stem):
    super().__init__()
    stage_sizes, block = ARCHITECTURES[name]
    base = int(64 * width)
    if stem == 'imagenet':
      layers = [conv(3, base, 7, 2), batch_norm(base), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, padding=1)]
    else:
      layers = [conv(3, base, 3), batch_norm(base), nn.ReLU(inplace=True)]
    cin = base
    for stage, num_blocks in enumerate(stage_sizes):
      for i in range(num_blocks):
        layers.append(block(cin, base * 2**stage, 2 if stage > 0 and i == 0 else 1))
        cin = base * 2**stage * block.expansion
    self.layers = nn.Sequential(*layers)
    self.num_features = cin

  def forward(self, x):
    return self.layers(x).mean(dim=(2, 3))


class UncentredBatchNorm(nn.BatchNorm1d):
  """BN with a scale and no bias: the head's last layer, as in ours (and SimCLR)."""

  def __init__(self, features):
    super().__init__(features, eps=BN_EPSILON, momentum=BN_MOMENTUM)
    self.bias = None


def dense(cin, cout):
  layer = nn.Linear(cin, cout, bias=False)   # every Dense of ours is followed by BN
  lecun_normal_(layer.weight)
  return layer


class Network(nn.Module):
  """Encoder and projection head; returns the projections (all the loss uses)."""

  def __init__(self, name, width, stem):
    super().__init__()
    self.encoder = ResNet(name, width, stem)
    d = self.encoder.num_features
    head = []
    for _ in range(HEAD_LAYERS - 1):
      head += [dense(d, d), nn.BatchNorm1d(d, eps=BN_EPSILON, momentum=BN_MOMENTUM),
               nn.ReLU(inplace=True)]
    self.head = nn.Sequential(*head, dense(d, HEAD_OUT_DIM), UncentredBatchNorm(HEAD_OUT_DIM))

  def forward(self, images):
    return self.head(self.encoder(images))


def expected_parameters(name, width, stem):
  """The trainable parameter count, from the architecture rather than the modules."""
  stage_sizes, block = ARCHITECTURES[name]
  base = int(64 * width)
  count = 3 * base * (49 if stem == 'imagenet' else 9) + 2 * base
  cin = base
  for stage, num_blocks in enumerate(stage_sizes):
    f = base * 2**stage
    cout = f * block.expansion
    for i in range(num_blocks):
      if block is BasicBlock:
        count += 9 * cin * f + 9 * f * f + 2 * (2 * f)
      else:
        count += cin * f + 9 * f * f + f * cout + 2 * (2 * f + cout)
      if i == 0 and (stage > 0 or cin != cout):
        count += cin * cout + 2 * cout
      cin = cout
  return count + (HEAD_LAYERS - 1) * (cin * cin + 2 * cin) + cin * HEAD_OUT_DIM + HEAD_OUT_DIM


def num_parameters(model):
  """Trainable parameters only: BN running statistics are buffers, not counted."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def nt_xent(projections, temperature):
  """``losses.nt_xent`` on one device: rows [0, n) are view 1, [n, 2n) view 2."""
  z = projections.float()
  z = z * torch.rsqrt(z.square().sum(-1, keepdim=True).clamp_min(1e-12))
  logits = z @ z.T / temperature
  rows = logits.shape[0]
  logits = logits.masked_fill(torch.eye(rows, dtype=torch.bool, device=z.device), -torch.inf)
  positives = (torch.arange(rows, device=z.device) + rows // 2) % rows
  return F.cross_entropy(logits, positives)


class LARS(torch.optim.Optimizer):
  """``optax.lars`` as ``optim.make_optimizer`` builds it: ``u = g + wd * w``
  scaled by ``eta * |w| / |u|`` (1 where either norm is 0) for the kernels; the
  groups with ``adapt=False`` (biases, BN) get neither decay nor trust ratio; then
  the momentum of ``lr * u``, which is what optax accumulates."""

  def __init__(self, param_groups, lr, momentum, weight_decay, trust_coefficient):
    super().__init__(param_groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                        trust_coefficient=trust_coefficient, adapt=True))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      params = [p for p in group['params'] if p.grad is not None]
      updates = [p.grad for p in params]
      if group['adapt']:
        updates = torch._foreach_add(updates, params, alpha=group['weight_decay'])
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(updates))
        ratio = torch.where((w_norm > 0) & (u_norm > 0),
                            group['trust_coefficient'] * w_norm / u_norm, 1.0)
        torch._foreach_mul_(updates, list(ratio.unbind()))
      buffers = [self.state[p].setdefault('momentum', torch.zeros_like(p)) for p in params]
      torch._foreach_mul_(buffers, group['momentum'])
      torch._foreach_add_(buffers, updates, alpha=group['lr'])
      torch._foreach_sub_(params, buffers)


def make_optimizer(model, name, lr):
  """Kernels decayed (and, in LARS, adapted); biases and BN parameters not."""
  kernels = [p for p in model.parameters() if p.ndim > 1]
  others = [p for p in model.parameters() if p.ndim <= 1]
  if name == 'lars':
    return LARS([{'params': kernels}, {'params': others, 'weight_decay': 0.0, 'adapt': False}],
                lr, MOMENTUM, WEIGHT_DECAY, TRUST_COEFFICIENT)
  return torch.optim.SGD([{'params': kernels}, {'params': others, 'weight_decay': 0.0}],
                         lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)


def make_step(args, device, compiled):
  """A fresh network and optimiser, and the step that trains them on two views."""
  torch.manual_seed(0)
  model = Network(args.model, args.width, args.stem).to(device)
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
  optimizer = make_optimizer(model, args.optimizer, BASE_LR * args.batch / 256)

  def forward(view1, view2):
    with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == 'bf16'):
      projections = model(torch.cat([view1, view2]))
    with torch.autocast(device.type, enabled=False):
      return nt_xent(projections, args.temperature)

  update = optimizer.step
  if compiled:
    forward, update = torch.compile(forward), torch.compile(update)

  def step(view1, view2):
    loss = forward(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    update()
    return loss.detach()

  return model, step


def synchronize(device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def device_name(device):
  if device.type == 'cuda':
    return torch.cuda.get_device_name(device)
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def warm_up(args, device, compiled, views):
  """(model, step, seconds of the first warmup step, of all of them)."""
  model, step = make_step(args, device, compiled)
  started = time.perf_counter()
  for i in range(args.warmup):
    step(*views)
    if i == 0:
      synchronize(device)
      first = time.perf_counter() - started
  synchronize(device)
  return model, step, first, time.perf_counter() - started


def warm_up_within(args, device, views, seconds):
  """warm_up of the compiled step, interrupted by TimeoutError after `seconds`
  (none: no limit), so that a slow torch.compile leaves time to time eager mode."""
  if not seconds:
    return warm_up(args, device, True, views)

  message = f'torch.compile warmup took over --compile_seconds={seconds:g}'
  alarm = {'armed': True, 'expired': False}

  def expire(signum, frame):
    del signum, frame
    if alarm['armed']:
      alarm['expired'] = True
      raise TimeoutError(message)

  import torch._inductor.compile_fx  # pylint: disable=import-outside-toplevel,unused-import
  # ^ imported before the alarm: one cut short leaves a half-initialised module.
  previous = signal.signal(signal.SIGALRM, expire)
  # Again every second after the first: torch may catch one and carry on compiling.
  signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
  try:
    result = warm_up(args, device, True, views)
  except Exception as error:  # torch.compile wraps the TimeoutError in its own errors
    if alarm['expired']:
      raise TimeoutError(message) from error
    raise
  finally:
    alarm['armed'] = False     # first: an alarm from here on does nothing
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
  if alarm['expired']:   # caught inside torch, which may have fallen back to eager itself
    raise TimeoutError(message)
  return result


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='resnet50', choices=ARCHITECTURES)
  parser.add_argument('--width', type=float, default=1.0, help='Channel multiplier.')
  parser.add_argument('--stem', default='imagenet', choices=('imagenet', 'cifar'))
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=256,
                      help='Global batch: images per view (the network sees twice as many).')
  parser.add_argument('--temperature', type=float, default=0.1)
  parser.add_argument('--optimizer', default='lars', choices=('lars', 'sgd'))
  parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'),
                      help='bf16: autocast (parameters and the loss in fp32).')
  parser.add_argument('--channels_last', action='store_true')
  parser.add_argument('--compile', action='store_true', help='torch.compile the step.')
  parser.add_argument('--compile_seconds', type=float,
                      help='Time eager mode instead where the compiled warmup takes longer.')
  parser.add_argument('--best_on_gpu', action='store_true',
                      help='On CUDA, also --channels_last and --compile (PyTorch at its best).')
  parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                      choices=('cpu', 'cuda'))
  parser.add_argument('--steps', type=int, default=20, help='Timed steps.')
  parser.add_argument('--warmup', type=int, default=5,
                      help='Untimed steps first (>= 1; >= 3 with --compile).')
  parser.add_argument('--threads', type=int, help="torch.set_num_threads; default torch's own.")
  parser.add_argument('--json', help='Also write the report to this path.')
  parser.add_argument('--check', action='store_true',
                      help='Only build the network and check its parameter count.')
  args = parser.parse_args()
  if args.best_on_gpu and args.device == 'cuda':
    args.channels_last = args.compile = True
  if args.warmup < 1 or args.steps < 1:
    parser.error('--warmup and --steps must be >= 1 (compilation happens in the first step).')
  if args.compile:
    # The compiled update is compiled again at the second step, once the optimizer
    # has momentum buffers (a guard on its empty state): keep both out of the timing.
    args.warmup = max(args.warmup, 3)
  return args


def write(report, path):
  if path:
    with open(path, 'w') as f:
      json.dump(report, f, indent=2)


def main():
  args = parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(args.device)
  report = {'framework': 'pytorch', 'config': dict(vars(args), threads=torch.get_num_threads())}

  if args.check:
    count = num_parameters(Network(args.model, args.width, args.stem))
    expected = expected_parameters(args.model, args.width, args.stem)
    print(f'parameters={count}' + ('' if count == expected else f' (expected {expected})'))
    write(dict(report, num_parameters=count), args.json)
    sys.exit(count != expected)

  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
  # XLA computes fp32 matmuls and convolutions in TF32 on recent GPUs; so does this.
  torch.set_float32_matmul_precision('high')
  generator = torch.Generator().manual_seed(0)
  views = [torch.randn(args.batch, 3, args.image_size, args.image_size, generator=generator)
           .to(device, memory_format=torch.channels_last if args.channels_last
               else torch.contiguous_format) for _ in range(2)]

  compile_error = None
  try:
    if args.compile:
      model, step, first, warmup = warm_up_within(args, device, views, args.compile_seconds)
    else:
      model, step, first, warmup = warm_up(args, device, False, views)
  except Exception as error:  # pylint: disable=broad-except
    if not args.compile:
      raise
    compile_error = f'{type(error).__name__}: {str(error).strip().splitlines()[0]}'
    print(f'torch.compile failed, timing eager mode: {compile_error}', file=sys.stderr)
    torch._dynamo.reset()
    model, step, first, warmup = warm_up(args, device, False, views)

  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  started = time.perf_counter()
  for _ in range(args.steps):
    loss = step(*views)
  synchronize(device)
  step_seconds = (time.perf_counter() - started) / args.steps

  report.update({
      'versions': {'torch': torch.__version__, 'python': platform.python_version(),
                   'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version()},
      'device_name': device_name(device),
      'optimizer_settings': {'lr': BASE_LR * args.batch / 256, 'momentum': MOMENTUM,
                             'weight_decay': WEIGHT_DECAY,
                             'trust_coefficient': TRUST_COEFFICIENT},
      'float32_matmul_precision': torch.get_float32_matmul_precision(),
      'num_parameters': num_parameters(model),
      'compiled': args.compile and compile_error is None,
      'compile_error': compile_error,
      'compile_seconds': first,
      'warmup_seconds': warmup,
      'step_seconds': step_seconds,
      'images_per_second': args.batch / step_seconds,
      'peak_memory_bytes': (torch.cuda.max_memory_allocated(device)
                            if device.type == 'cuda' else None),
      'loss': loss.item(),
  })
  memory = report['peak_memory_bytes']
  print(f'pytorch {args.model} x{args.width:g} {args.stem} {args.image_size}px '
        f'batch {args.batch} {args.precision} {args.optimizer} on {report["device_name"]} '
        f'({"compiled" if report["compiled"] else "eager"}): {step_seconds:.4f} s/step, '
        f'{report["images_per_second"]:.1f} images/s, loss {report["loss"]:.4f}, '
        f'parameters={report["num_parameters"]}, peak memory '
        f'{"n/a" if memory is None else f"{memory / 2**30:.2f} GiB"}')
  write(report, args.json)


if __name__ == '__main__':
  main()
