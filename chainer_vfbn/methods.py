"""The methods of the paper's Table 1, by name, and how each one is put together.

``bp``                BackProp: the whole ResNet end to end.
``bottom``            Bottom half with back prop: the lower half plus a head of v_f's
                      architecture, end to end; the test error is that head's.
``layerwise``         Layer-wise supervised loss: the lower half learns through an
                      auxiliary v_f-shaped head's own loss, the upper half on the
                      detached h; the prediction is the full network's.
``jaderberg-resnet``  Jaderberg's small-ResNet synthesizer.
``jaderberg-linear``  Jaderberg's Linear synthesizer.
``vfbn``              VFBN (ours); ``alpha_gs = 0`` keeps v_f untrained.
"""
import collections

from chainer import optimizers

from chainer_vfbn import config, model, sgd, synthesizers, updaters

METHODS = ('bp', 'bottom', 'layerwise', 'jaderberg-resnet', 'jaderberg-linear', 'vfbn')
SYNTHESIZERS = ('jaderberg-resnet', 'jaderberg-linear', 'vfbn')

Row = collections.namedtuple('Row', 'label method alpha_gs paper_error')

#: Table 1 of the paper, in its order: the row's label, our method and alpha_gs,
#: and the paper's CIFAR-10 test error (%).
TABLE1 = (
    Row('BackProp', 'bp', None, 5.15),
    Row('Bottom half with back prop', 'bottom', None, 5.76),
    Row('Layer-wise supervised loss', 'layerwise', None, 5.71),
    Row("Jaderberg's small-ResNet", 'jaderberg-resnet', 1e-3, 20.45),
    Row("Jaderberg's Linear", 'jaderberg-linear', 1e-3, 15.56),
    Row('VFBN (alpha_gs = 0)', 'vfbn', 0.0, 5.73),
    Row('VFBN (alpha_gs = 1e-3)', 'vfbn', 1e-3, 5.51),
)


def row_argv(row):
    """``train.py`` arguments that select one Table 1 row."""
    if row.alpha_gs is None:
        return ['--method', row.method]
    return ['--synth', row.method, '--alpha-gs', repr(row.alpha_gs)]


def find_row(method, alpha_gs):
    for row in TABLE1:
        if row.method == method and (row.alpha_gs is None or row.alpha_gs == alpha_gs):
            return row
    return None


def network_optimizer(link, lr=config.LR, momentum=config.MOMENTUM,
                      weight_decay=config.WEIGHT_DECAY):
    """MomentumSGD with weight decay, every parameter updated at once
    (:mod:`chainer_vfbn.sgd`), set up on ``link``. The defaults are chainer-cifar10's
    ResNet-110 recipe (lr 0.1, momentum 0.9, weight decay 1e-4); pass your own for
    another network."""
    opt = sgd.MomentumSGDWeightDecay(lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt.setup(link)
    return opt


def make_synthesizer(name, h_channels=64, jaderberg_scaled=True,
                     vfbn_normalized_loss=False):
    if name == 'jaderberg-linear':
        return synthesizers.JaderbergLinear(h_channels, scaled=jaderberg_scaled)
    if name == 'jaderberg-resnet':
        return synthesizers.JaderbergResNet(h_channels, scaled=jaderberg_scaled)
    if name == 'vfbn':
        return synthesizers.VFBN(synthesizers.VirtualForward(h_channels),
                                 normalized_loss=vfbn_normalized_loss)
    raise ValueError('unknown synthesizer %r; choose one of: %s'
                     % (name, ', '.join(SYNTHESIZERS)))


class Setup(object):
    """What a method needs to train: the updater, the network that predicts at test
    time, and the optimizers whose learning rate follows the schedule."""

    def __init__(self, updater, predictor, scheduled):
        self.updater, self.predictor, self.scheduled = updater, predictor, scheduled


def build(method, iterator, device, units=config.UNITS_PER_BLOCK, split=None,
          alpha_gs=config.ALPHA_GS, lr=config.LR, momentum=config.MOMENTUM,
          weight_decay=config.WEIGHT_DECAY, diag_interval=1, jaderberg_scaled=True,
          vfbn_normalized_loss=False):
    """Build the networks, optimizers and updater of one Table 1 method."""
    if method not in METHODS:
        raise ValueError('unknown method %r; choose one of: %s' % (method, ', '.join(METHODS)))
    if alpha_gs < 0:
        raise ValueError('alpha_gs must be >= 0, got %r' % alpha_gs)
    lower, upper = model.build_resnet(units, split)
    h_channels = lower.units[-1].out_ch if len(lower.units) else config.STEM_CHANNELS

    def net_opt(link):
        return network_optimizer(link, lr, momentum, weight_decay)

    if method in ('bp', 'bottom'):
        top = upper if method == 'bp' else synthesizers.VirtualForward(h_channels)
        net = model.Net(lower, top)
        opt = net_opt(net)
        return Setup(updaters.BackpropUpdater(iterator, opt, device, method), net, [opt])

    predictor = model.Net(lower, upper)
    opts = {'lower': net_opt(lower), 'upper': net_opt(upper)}
    if method == 'layerwise':
        opts['head'] = net_opt(synthesizers.VirtualForward(h_channels))
        updater = updaters.LayerwiseUpdater(iterator, opts, device=device, method=method,
                                            diag_interval=diag_interval)
        return Setup(updater, predictor, list(opts.values()))

    synth = make_synthesizer(method, h_channels, jaderberg_scaled, vfbn_normalized_loss)
    opts['synth'] = optimizers.Adam(alpha=alpha_gs)  # paper: alpha_gs is Adam's alpha
    opts['synth'].setup(synth)
    updater = updaters.DecoupledUpdater(
        iterator, opts, train_synth=alpha_gs > 0, device=device,
        method='%s (alpha_gs=%g)' % (method, alpha_gs), diag_interval=diag_interval)
    return Setup(updater, predictor, [opts['lower'], opts['upper']])
