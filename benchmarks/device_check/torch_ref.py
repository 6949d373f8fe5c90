"""Section ``torch``: the same ResNet-110 in PyTorch on the same GPU (cuDNN, eager),
fp32 and TF32, as the yardstick of what this GPU does with this network; first a
check, in float64 on the CPU, that it is the same function as the Chainer network."""
import time

import common  # first: chainer_vfbn before Chainer
from common import RESNET110_PARAMS, log, short_error, to_host, verdict
from numerics import RTOL64, build_nets, numerics_inputs
from timing import summarize_times

import chainer
import chainer.functions as F
import numpy

from chainer_vfbn import config, model

# ---------------------------------------------------------------------------
# 3. PyTorch reference: the same network, cuDNN, eager.

def torch_resnet(depth):
    """The paper's ResNet-110 variant (SPEC section 2) in PyTorch, written to match
    chainer_vfbn.model layer for layer (parameter count included)."""
    import torch
    from torch import nn

    def bn(ch):  # Chainer's BatchNormalization defaults: eps 2e-5, decay 0.9
        return nn.BatchNorm2d(ch, eps=2e-5, momentum=0.1)

    class Unit(nn.Module):
        def __init__(self, in_ch, out_ch, stride):
            super().__init__()
            self.pad, self.stride = out_ch - in_ch, stride
            self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
            self.bn1 = bn(out_ch)
            self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
            self.bn2 = bn(out_ch)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            s = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
            if self.pad:  # parameter-free shortcut: zero channels appended
                s = nn.functional.pad(s, (0, 0, 0, 0, 0, self.pad))
            return torch.relu(h + s)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, config.STEM_CHANNELS, 3, 1, 0, bias=True)
            self.bn1 = bn(config.STEM_CHANNELS)
            self.units = nn.Sequential(*[Unit(*s) for s in model.unit_specs(depth)])
            self.fc = nn.Linear(config.BLOCK_CHANNELS[-1], config.N_CLASSES)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):  # He-normal, as the Chainer model
                    nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')

        def forward(self, x):
            h = self.units(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(h.mean(dim=(2, 3)))

    return ResNet()


def copy_chainer_weights(tnet, net):
    """Load a Chainer ``model.Net``'s parameters into :func:`torch_resnet`'s module
    (``/upper/units/j`` is unit ``split + j`` of the whole network)."""
    import torch
    split, leaf = len(net.lower.units), {'W': 'weight', 'b': 'bias',
                                         'gamma': 'weight', 'beta': 'bias'}
    copied = {}
    for name, p in net.namedparams():
        half, *path = name.strip('/').split('/')
        if path[0] == 'units' and half == 'upper':
            path[1] = str(int(path[1]) + split)
        copied['.'.join(path[:-1] + [leaf[path[-1]]])] = torch.from_numpy(to_host(p.array))
    params = dict(tnet.named_parameters())
    if set(copied) != set(params):
        raise ValueError('parameter names differ: %s' % sorted(set(copied) ^ set(params)))
    with torch.no_grad():
        for name, value in copied.items():
            params[name].copy_(value)


def torch_same_network(torch, depth, batch, seed):
    """Normwise difference of the logits and the loss of the Chainer and the PyTorch
    network with the same float64 weights and inputs, both on the CPU in train mode:
    ~1e-15 when the two are the same function."""
    nets = build_nets(depth, numpy.float64, seed)
    tnet = torch_resnet(depth).double()
    copy_chainer_weights(tnet, nets['net'])
    x, t = numerics_inputs(batch, seed)
    x = x.astype(numpy.float64)
    with chainer.using_config('train', True):
        logits = nets['net'](x)
    loss = F.softmax_cross_entropy(logits, t).array
    t_logits = tnet(torch.from_numpy(x))
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(t).long())
    ref, got = logits.array, t_logits.detach().numpy()
    return {'depth': depth, 'batch': batch,
            'logits_err': float(numpy.abs(got - ref).max() / numpy.abs(ref).max()),
            'loss_err': float(abs(t_loss.item() - loss) / abs(loss))}


def set_tf32(torch, on):
    """TF32 for cuBLAS and cuDNN on or off (the legacy flags, which PyTorch >= 2.9
    maps onto its ``fp32_precision`` settings); returns the settings as PyTorch then
    reports them, in both vocabularies where it has them."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    flags = {'matmul.allow_tf32': torch.backends.cuda.matmul.allow_tf32,
             'cudnn.allow_tf32': torch.backends.cudnn.allow_tf32}
    for name, obj in (('matmul', torch.backends.cuda.matmul),
                      ('cudnn.conv', getattr(torch.backends.cudnn, 'conv', None))):
        if hasattr(obj, 'fp32_precision'):
            flags[name + '.fp32_precision'] = obj.fp32_precision
    return flags


def torch_reference(args, gpu, report):
    sec = report.section('torch')
    try:
        import torch
    except Exception as e:
        sec['skipped'] = 'PyTorch not importable (%s: %s)' % (type(e).__name__, e)
        log('torch: skipped, ' + sec['skipped'])
        return
    if gpu and not torch.cuda.is_available():
        sec['skipped'] = 'torch.cuda.is_available() is False'
        log('torch: skipped, ' + sec['skipped'])
        return
    dev = torch.device('cuda' if gpu else 'cpu')
    torch.manual_seed(args.seed)
    net = torch_resnet(args.depth).to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    lower, upper = model.build_resnet(args.depth)
    chainer_params = sum(p.size for p in model.Net(lower, upper).params())
    sec.update(torch=torch.__version__, device=str(dev), depth=args.depth,
               batch=args.batch, warmup=args.warmup, timed=args.timed,
               params=n_params, chainer_params=chainer_params,
               params_match=n_params == chainer_params
               and (args.depth != 18 or n_params == RESNET110_PARAMS),
               what='forward + backward + SGD(momentum 0.9, weight decay 1e-4) step, '
                    'eager (no torch.compile), cudnn.benchmark, NCHW', results={})
    log('torch: %s on %s, %d parameters (Chainer: %d)'
        % (torch.__version__, dev, n_params, chainer_params))
    try:
        same = torch_same_network(torch, args.numerics_depth, args.numerics_batch, args.seed)
        same['passed'] = max(same['logits_err'], same['loss_err']) <= RTOL64
        log('torch: same function as the Chainer network (float64, CPU, depth %d): '
            'logits err %.1e, loss err %.1e: %s' % (same['depth'], same['logits_err'],
                                                    same['loss_err'], verdict(same['passed'])))
    except Exception as e:
        same = short_error(e)
        log('torch: same-network check: ERROR ' + same['error'])
    sec['same_network'] = same
    report.save()
    if gpu:
        sec.update(cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(dev))
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.SGD(net.parameters(), lr=config.LR, momentum=config.MOMENTUM,
                          weight_decay=config.WEIGHT_DECAY)
    gen = torch.Generator(device='cpu').manual_seed(args.seed)
    x = torch.randn(args.batch, 3, config.INPUT_SIZE, config.INPUT_SIZE,
                    generator=gen).to(dev)
    t = torch.randint(0, config.N_CLASSES, (args.batch,), generator=gen).to(dev)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def step():
        sync()
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - start, loss.detach()

    for mode in (('fp32', 'tf32') if gpu else ('fp32',)):
        if common.CLOCK.left() <= 0:
            sec['results'][mode] = {'skipped': 'time budget spent'}
            continue
        try:
            flags = set_tf32(torch, mode == 'tf32') if gpu else {}
            first, _ = step()
            for _ in range(args.warmup - 1):
                step()
            runs = [step() for _ in range(args.timed)]
            res = summarize_times([r[0] for r in runs])
            res.update(first_step_s=first, flags=flags, final_loss=runs[-1][1].item())
            sec['results'][mode] = res
            log('torch %s: median %.1f ms/step (first step %.2f s)'
                % (mode, res['median_ms'], first))
        except Exception as e:
            sec['results'][mode] = short_error(e)
            log('torch %s: ERROR %s' % (mode, sec['results'][mode]['error']))
        report.save()
    # Chainer's backprop steps measured before this section (paths, and timing when
    # it ran first) over PyTorch's.
    chainer_times = {}
    for name in ('paths', 'timing'):
        for key, r in report.data['sections'].get(name, {}).get('results', {}).items():
            if key.startswith('bp') and 'median_ms' in r:
                chainer_times[key] = r['median_ms']
    sec['chainer_over_torch'] = {
        'Chainer %s / PyTorch %s' % (key, mode): ms / r['median_ms']
        for mode, r in sec['results'].items() if 'median_ms' in r
        for key, ms in chainer_times.items()}
    if gpu:
        set_tf32(torch, False)
        del net, opt, x, t
        torch.cuda.empty_cache()
