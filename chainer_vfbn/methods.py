"""The methods of the paper's Table 1: the one registry of its rows, and how each
method is put together, in two explicit steps.

``bp``                BackProp: the whole ResNet end to end.
``bottom``            Bottom half with back prop: the lower half plus a head of v_f's
                      architecture, end to end; the test error is that head's.
``layerwise``         Layer-wise supervised loss: the lower half learns through an
                      auxiliary v_f-shaped head's own loss, the upper half on the
                      detached h; the prediction is the full network's.
``jaderberg-resnet``  Jaderberg's small-ResNet synthesizer.
``jaderberg-linear``  Jaderberg's Linear synthesizer.
``vfbn``              VFBN (ours); ``alpha_gs = 0`` keeps v_f untrained.

:func:`build_networks` makes the networks of a method (all ``evaluate.py`` needs);
:func:`build_updater` adds the optimizers and the updater that trains them.
"""
import collections

import chainer
from chainer import optimizers

from chainer_vfbn import adam, config, model, sgd, synthesizers, updaters
from chainer_vfbn import fused  # noqa: F401  (defines chainer.config.vfbn_fused_*)

METHODS = ('bp', 'bottom', 'layerwise', 'jaderberg-resnet', 'jaderberg-linear', 'vfbn')
SYNTHESIZERS = ('jaderberg-resnet', 'jaderberg-linear', 'vfbn')

Row = collections.namedtuple('Row', 'label method alpha_gs paper_error slug color linestyle')

#: Table 1 of the paper, in its order: the row's label, our method and alpha_gs, the
#: paper's CIFAR-10 test error (%), the folder name of its runs, and its colour and
#: line style in the figures (the paper's three contenders strong and solid).
TABLE1 = (
    Row('BackProp', 'bp', None, 5.15, 'bp', 'black', '-'),
    Row('Bottom half with back prop', 'bottom', None, 5.76, 'bottom', 'tab:gray', '--'),
    Row('Layer-wise supervised loss', 'layerwise', None, 5.71, 'layerwise', 'tab:olive', '-.'),
    Row("Jaderberg's small-ResNet", 'jaderberg-resnet', 1e-3, 20.45, 'jaderberg-resnet',
        'tab:orange', '-'),
    Row("Jaderberg's Linear", 'jaderberg-linear', 1e-3, 15.56, 'jaderberg-linear',
        'tab:red', '-'),
    Row('VFBN (alpha_gs = 0)', 'vfbn', 0.0, 5.73, 'vfbn-0', 'tab:cyan', '--'),
    Row('VFBN (alpha_gs = 1e-3)', 'vfbn', 1e-3, 5.51, 'vfbn-1e-3', 'tab:blue', '-'),
)
#: The rows that decide the paper's claim (VFBN keeps pace with BP, Jaderberg falls
#: behind), by slug; the table runs them first.
CLAIM = ('bp', 'vfbn-1e-3', 'jaderberg-linear')


def row_by_slug(slug):
    for row in TABLE1:
        if row.slug == slug:
            return row
    raise KeyError(slug)


def find_row(method, alpha_gs):
    for row in TABLE1:
        if row.method == method and (row.alpha_gs is None or row.alpha_gs == alpha_gs):
            return row
    return None


def row_argv(row):
    """``train.py`` arguments that select one Table 1 row."""
    if row.alpha_gs is None:
        return ['--method', row.method]
    return ['--synth', row.method, '--alpha-gs', repr(row.alpha_gs)]


# ---------------------------------------------------------------------------
# The networks.

def make_synthesizer(name, h_channels=64, *, jaderberg_scaled=True,
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


class Networks(object):
    """The networks of one method. ``trained`` maps each optimizer's name to its
    target (a trainer snapshot keeps that target under ``updater/model:NAME/``);
    ``predictor`` is the network whose output is the test prediction."""

    def __init__(self, method, trained, predictor):
        self.method, self.trained, self.predictor = method, trained, predictor


def build_networks(method, *, depth=config.UNITS_PER_BLOCK, split=None,
                   jaderberg_scaled=True, vfbn_normalized_loss=False):
    """The networks of one Table 1 method, freshly initialised."""
    if method not in METHODS:
        raise ValueError('unknown method %r; choose one of: %s' % (method, ', '.join(METHODS)))
    lower, upper = model.build_resnet(depth, split)
    h_channels = lower.units[-1].out_ch if len(lower.units) else config.STEM_CHANNELS
    if method in ('bp', 'bottom'):
        top = upper if method == 'bp' else synthesizers.VirtualForward(h_channels)
        net = model.Net(lower, top)
        return Networks(method, {'main': net}, net)
    trained = {'lower': lower, 'upper': upper}
    if method == 'layerwise':
        trained['head'] = synthesizers.VirtualForward(h_channels)
    else:
        trained['synth'] = make_synthesizer(method, h_channels,
                                            jaderberg_scaled=jaderberg_scaled,
                                            vfbn_normalized_loss=vfbn_normalized_loss)
    return Networks(method, trained, model.Net(lower, upper))


# ---------------------------------------------------------------------------
# The optimizers and the updater.

def network_optimizer(link, lr=config.LR, momentum=config.MOMENTUM,
                      weight_decay=config.WEIGHT_DECAY):
    """MomentumSGD with weight decay, every parameter updated at once
    (:mod:`chainer_vfbn.sgd`), set up on ``link``. The defaults are chainer-cifar10's
    ResNet-110 recipe (lr 0.1, momentum 0.9, weight decay 1e-4); pass your own for
    another network."""
    opt = sgd.MomentumSGDWeightDecay(lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt.setup(link)
    return opt


def synthesizer_optimizer(synth, alpha_gs=config.ALPHA_GS):
    """Adam with ``alpha = alpha_gs`` (the paper's alpha_gs is Adam's alpha), constant,
    set up on the synthesizer ``synth``: every synthesizer of every process uses it.
    Every parameter is updated at once (:class:`chainer_vfbn.adam.FlatAdam`, the same
    numbers and snapshots) unless ``chainer.config.vfbn_fused_adam`` is False when
    this is called: then Chainer's own Adam."""
    if chainer.config.vfbn_fused_adam:
        opt = adam.FlatAdam(alpha=alpha_gs)
    else:
        opt = optimizers.Adam(alpha=alpha_gs)
    opt.setup(synth)
    return opt


def build_optimizers(networks, *, alpha_gs=config.ALPHA_GS, lr=config.LR,
                     momentum=config.MOMENTUM, weight_decay=config.WEIGHT_DECAY):
    """One optimizer per trained network, by the network's name: the network's
    optimizer (:func:`network_optimizer`) for each, the synthesizer's
    (:func:`synthesizer_optimizer`) for ``'synth'``."""
    if not alpha_gs >= 0:
        raise ValueError('alpha_gs must be >= 0, got %r' % alpha_gs)
    return {name: synthesizer_optimizer(link, alpha_gs) if name == 'synth'
            else network_optimizer(link, lr, momentum, weight_decay)
            for name, link in networks.trained.items()}


def scheduled_optimizers(optimizers):
    """The optimizers whose learning rate follows the schedule: the networks', not the
    synthesizer's (its alpha_gs is constant)."""
    return [opt for name, opt in optimizers.items() if name != 'synth']


def describe(method, alpha_gs):
    """A synthetic-gradient method in words, as its updater's error messages name it."""
    return '%s (alpha_gs=%g)' % (method, alpha_gs)


def build_updater(networks, *, iterator, device=None, alpha_gs=config.ALPHA_GS,
                  lr=config.LR, momentum=config.MOMENTUM, weight_decay=config.WEIGHT_DECAY,
                  diag_interval=1):
    """The updater that trains ``networks`` in this one process, and the optimizers
    whose learning rate follows the schedule: ``(updater, scheduled)``. (With the
    upper half in other processes: :func:`chainer_vfbn.pipeline.build_updater`.)"""
    method = networks.method
    opts = build_optimizers(networks, alpha_gs=alpha_gs, lr=lr, momentum=momentum,
                            weight_decay=weight_decay)
    if method in ('bp', 'bottom'):
        updater = updaters.BackpropUpdater(iterator, opts['main'], device=device,
                                           method=method)
    elif method == 'layerwise':
        updater = updaters.LayerwiseUpdater(iterator, opts, device=device, method=method,
                                            diag_interval=diag_interval)
    else:
        updater = updaters.DecoupledUpdater(iterator, opts, train_synth=alpha_gs > 0,
                                            device=device, method=describe(method, alpha_gs),
                                            diag_interval=diag_interval)
    return updater, scheduled_optimizers(opts)


class Setup(object):
    """What a method needs to train: the updater, the network that predicts at test
    time, and the optimizers whose learning rate follows the schedule."""

    def __init__(self, updater, predictor, scheduled):
        self.updater, self.predictor, self.scheduled = updater, predictor, scheduled


def build(method, *, iterator, device=None, depth=config.UNITS_PER_BLOCK, split=None,
          alpha_gs=config.ALPHA_GS, lr=config.LR, momentum=config.MOMENTUM,
          weight_decay=config.WEIGHT_DECAY, diag_interval=1, jaderberg_scaled=True,
          vfbn_normalized_loss=False):
    """:func:`build_networks`, then :func:`build_updater`, as one :class:`Setup`."""
    networks = build_networks(method, depth=depth, split=split,
                              jaderberg_scaled=jaderberg_scaled,
                              vfbn_normalized_loss=vfbn_normalized_loss)
    updater, scheduled = build_updater(networks, iterator=iterator, device=device,
                                       alpha_gs=alpha_gs, lr=lr, momentum=momentum,
                                       weight_decay=weight_decay,
                                       diag_interval=diag_interval)
    return Setup(updater, networks.predictor, scheduled)
