"""``evaluate.py``: the test error of a trained network, from its run folder.

``train.py`` writes ``args.json`` (the method, depth, split, data, ...) beside the
weights. This module rebuilds exactly the network that predicts at test time for that
method (the full ResNet, or for "bottom half with back prop" the lower half and its
head; SPEC section 4), loads weights into it from one of the files a run leaves:

* ``model.npz`` (the predictor at the end, the default) or ``model_iter_N.npz``;
* a trainer snapshot ``snapshot_iter_N``, where the predictor's halves are the targets
  of the updater's optimizers (``updater/model:main/`` for ``bp`` and ``bottom``,
  ``updater/model:lower/`` and ``updater/model:upper/`` for the split methods);

and reports the paper's 36-view test error (appendix B.1, SPEC section 5) and the
single-view error, as text and optionally as JSON with ``result.json``'s key names.
A weights file of another architecture is refused before anything is evaluated.
"""
import argparse
import json
import os
import re
import sys

import chainer
import numpy

from chainer_vfbn import arguments, config, data, methods, runs
from chainer_vfbn.evaluation import PassProgress, final_test_errors, test_errors
from chainer_vfbn.runs import EXIT_BAD_INPUT, UsageError, read_json, write_json

DEFAULT_WEIGHTS = 'model.npz'
TRAINER_PREFIX = 'updater/'


def test_images_arg(text):
    """``--test-images``: a positive count, or ``all``."""
    if text == 'all':
        return 'all'
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError('expected a count >= 1 or "all", got %r' % text)
    return n


def build_parser():
    p = runs.ArgumentParser(
        description='Test error of a network trained by train.py: the paper\'s 36-view '
                    'averaged error and the single-view error (Miyato et al. 2017, '
                    'appendix B.1). By default the run\'s own data, test images and views.')
    p.add_argument('run', metavar='RUN_DIR_OR_SNAPSHOT', nargs='?', default=None,
                   help='the output folder of train.py, or a weights file inside one '
                        '(model.npz, model_iter_N.npz or snapshot_iter_N); default: %s, '
                        'train.py\'s default --out' % runs.DEFAULT_OUT)
    p.add_argument('--snapshot', metavar='FILE', default=None,
                   help='weights file to load, a path or a name inside the run folder '
                        '(default: %s)' % DEFAULT_WEIGHTS)
    p.add_argument('--device', '-d', default=None,
                   help='Chainer device specifier (@numpy, @cupy:0, ...)')
    p.add_argument('--gpu', '-g', type=int, default=None,
                   help='GPU id (the same as --device @cupy:ID; negative: CPU)')
    p.add_argument('--dataset', choices=data.DATASETS, default=None,
                   help='dataset (default: the run\'s)')
    p.add_argument('--data-dir', default=None,
                   help='where the dataset lies (default: the run\'s, when the dataset '
                        'is the run\'s)')
    p.add_argument('--test-images', type=test_images_arg, default=None, metavar='N|all',
                   help='evaluate on the first N test images (default: as many as the '
                        'run was evaluated on)')
    p.add_argument('--views', type=int, choices=(config.N_VIEWS, 1), default=None,
                   help='36: the paper\'s averaged test error; 1: centre view only '
                        '(default: the run\'s --eval-views)')
    p.add_argument('--tta-images', type=int, default=None, metavar='N',
                   help='with 36 views, the 36-view error over the first N test images '
                        'and the centre-view error over all (default: the run\'s '
                        '--tta-images)')
    p.add_argument('--json', metavar='OUT', default=None,
                   help='also write the result as JSON to OUT (atomically), or to '
                        'stdout alone with "-"')
    return p


def locate(run, snapshot):
    """``(run folder, weights file)`` from the positional argument and --snapshot."""
    if run is None:
        if not os.path.isfile(os.path.join(runs.DEFAULT_OUT, 'args.json')):
            raise UsageError('no run in %s/ (train.py\'s default --out) under %s; give the '
                             'run folder: python evaluate.py RUN_DIR'
                             % (runs.DEFAULT_OUT, os.getcwd()))
        run = runs.DEFAULT_OUT
    if os.path.isdir(run):
        run_dir = run
        weights = os.path.join(run_dir, snapshot or DEFAULT_WEIGHTS)
        if snapshot and not os.path.isfile(weights) and os.path.isfile(snapshot):
            weights = snapshot
    elif os.path.isfile(run):
        if snapshot:
            raise UsageError('%s is a file: give either a weights file or --snapshot, '
                             'not both' % run)
        run_dir, weights = os.path.dirname(run) or '.', run
    else:
        raise UsageError('%s: no such run folder or weights file' % run)
    if not os.path.isfile(os.path.join(run_dir, 'args.json')):
        raise UsageError('no args.json in %s: give the output folder of train.py, or '
                         'a weights file inside it' % run_dir)
    if not os.path.isfile(weights):
        found = sorted(f for f in os.listdir(run_dir)
                       if f.startswith(('snapshot_iter_', 'model_iter_')))
        raise UsageError('%s: no such weights file; %s' % (
            weights, 'give --snapshot with one of ' + ', '.join(found) if found else
            'the run left no snapshot yet'))
    return run_dir, weights


def build_predictor(run_args, device):
    """The predicting network of the run and the trainer-snapshot paths of its parts.

    The networks come from :func:`chainer_vfbn.methods.build_networks`, given the
    run's arguments, so they are built exactly as in training. Returns
    ``(predictor, parts)``: ``parts`` lists ``(link, path)``, where a trainer
    snapshot keeps ``link``'s parameters under ``path``: the ``model:NAME`` of the
    optimizer whose target it is.
    """
    get = run_args.get
    try:
        nets = methods.build_networks(
            get('method', 'bp'), depth=get('depth', config.UNITS_PER_BLOCK),
            split=get('split'), jaderberg_scaled=get('jaderberg_scale', True),
            vfbn_normalized_loss=get('vfbn_normalized_loss', False))
    except ValueError as e:
        raise UsageError('args.json describes no network this version can build (%s)' % e)
    predictor = nets.predictor
    predictor.to_device(device)
    owner = {id(link): name for name, link in nets.trained.items()}
    if id(predictor) in owner:
        parts = [(predictor, '%smodel:%s/' % (TRAINER_PREFIX, owner[id(predictor)]))]
    else:
        parts = [(child, '%smodel:%s/' % (TRAINER_PREFIX, owner[id(child)]))
                 for child in predictor.children()]
    return predictor, parts


def serialized_names(link):
    """The names ``save_npz`` gives ``link``'s parameters and persistent values."""
    s = chainer.serializers.DictionarySerializer()
    s.save(link)
    return set(s.target)


def load_weights(path, predictor, parts, describe):
    """Load ``path`` (a predictor npz or a trainer snapshot) into ``predictor``.

    Every name must match both ways: a file of another depth, split or method is
    refused with :class:`UsageError` instead of being half loaded. Returns the kind
    of file and the iteration it was saved at (None if the file does not say).
    """
    try:
        with numpy.load(path) as f:
            names = set(f.files)
            iteration = int(f[TRAINER_PREFIX + 'iteration']) \
                if TRAINER_PREFIX + 'iteration' in names else None
    except Exception as e:
        raise UsageError('%s is not a Chainer npz file (%s: %s)'
                         % (path, type(e).__name__, str(e).splitlines()[0] if str(e) else ''))
    trainer = any(n.startswith(TRAINER_PREFIX) for n in names)
    if not trainer:
        parts = [(predictor, '')]
        m = re.match(r'model_iter_(\d+)\.npz$', os.path.basename(path))
        iteration = int(m.group(1)) if m else None
    for link, prefix in parts:
        held = {n[len(prefix):] for n in names if n.startswith(prefix)}
        expected = serialized_names(link)
        if held != expected:
            missing, extra = sorted(expected - held), sorted(held - expected)
            raise UsageError(
                '%s does not hold the network that %s: %d values missing%s, %d '
                'unexpected%s; one of the two files is another run\'s' % (path, describe, len(missing),
                                     ' (%s%s)' % (prefix, missing[0]) if missing else '',
                                     len(extra), ' (%s%s)' % (prefix, extra[0]) if extra else ''))
        try:
            chainer.serializers.load_npz(path, link, path=prefix)
        except (KeyError, ValueError) as e:
            raise UsageError('%s does not fit the network that %s: %s'
                             % (path, describe, str(e).splitlines()[0]))
    return ('trainer snapshot' if trainer else 'predictor'), iteration


def check_tta(tta, n_images, the_runs):
    """Refuse a 36-view error over more test images than are evaluated, as train.py
    does (``the_runs``: the count is the run's own --tta-images)."""
    if tta is not None and tta < 1:
        raise UsageError('--tta-images must be >= 1, got %d' % tta)
    if tta and n_images != 'all' and tta > n_images:
        raise UsageError('--tta-images %d%s is more than the %d test images evaluated '
                         '(--test-images)' % (tta, ' (the run\'s)' if the_runs else '',
                                              n_images))


def evaluate(args):
    """Evaluate one run's weights; return the result dictionary."""
    run_dir, weights = locate(args.run, args.snapshot)
    run_args = arguments.read_recorded(run_dir)
    method = run_args.get('method', 'bp')
    describe = '%s describes: method %s, depth %s, split %s' % (
        os.path.join(run_dir, 'args.json'), method, run_args.get('depth'),
        'middle' if run_args.get('split') is None else run_args.get('split'))
    n_images = args.test_images or run_args.get('test_images') or 'all'
    tta = args.tta_images if args.tta_images is not None else run_args.get('tta_images')
    check_tta(tta, n_images, args.tta_images is None)

    device = runs.resolve_device(args.device, args.gpu)
    predictor, parts = build_predictor(run_args, device)
    kind, iteration = load_weights(weights, predictor, parts, describe)
    own_model = os.path.join(run_dir, DEFAULT_WEIGHTS)
    if iteration is None and os.path.isfile(own_model) and os.path.samefile(weights, own_model):
        result_path = os.path.join(run_dir, 'result.json')  # model.npz is saved last
        if os.path.isfile(result_path):
            iteration = read_json(result_path, 'the run\'s result').get('iteration')

    dataset = args.dataset or run_args.get('dataset', 'cifar10')
    data_dir = args.data_dir
    if data_dir is None and dataset == run_args.get('dataset', 'cifar10'):
        data_dir = run_args.get('data_dir')
    views = args.views or (config.N_VIEWS if tta else
                           run_args.get('eval_views', config.EVAL_VIEWS))
    _, (test_x, test_y) = data.load(dataset, data_dir)
    if n_images != 'all':
        test_x, test_y = test_x[:n_images], test_y[:n_images]
    check_tta(tta, len(test_x), args.tta_images is None)

    progress = PassProgress(sys.stderr, 60.0)  # stdout may be the --json output
    if views == config.N_VIEWS and tta and tta < len(test_x):
        errors = final_test_errors(predictor, test_x, test_y, device, tta, progress=progress)
    else:
        errors = test_errors(predictor, test_x, test_y, device, views, progress=progress)
    return {
        'run': run_dir, 'weights': weights, 'weights_kind': kind, 'iteration': iteration,
        'method': method, 'alpha_gs': run_args.get('alpha_gs'),
        'depth': run_args.get('depth'), 'split': run_args.get('split'),
        'dataset': dataset, 'test_images': len(test_x), 'eval_views': errors['views'],
        'test_error': errors['error'], 'test_error_single': errors['error_single'],
        'tta_images': errors.get('tta_images', len(test_x) if errors['views'] > 1 else 0),
    }


def report(result):
    """The result as lines of text."""
    it = result['iteration']
    row = methods.find_row(result['method'], result['alpha_gs'])
    return '\n'.join([
        '# run %s: %s, depth %s units/block' % (result['run'], row.label if row else
                                                result['method'], result['depth']),
        '# weights %s (%s%s)' % (result['weights'], result['weights_kind'],
                                 ', iteration %d' % it if it is not None else ''),
        '# data %s: %d test images' % (result['dataset'], result['test_images']),
        'test error %.2f%% (%d-view), %.2f%% (single view)'
        % (100 * result['test_error'], result['eval_views'],
           100 * result['test_error_single']),
    ])


def main(argv=None):
    """Command-line entry point: exit 0 on success; one line on stderr and exit 2
    on bad input (a missing or foreign file, an unavailable device or dataset)."""
    prog = os.path.basename(sys.argv[0])
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args)
    except (UsageError, data.DataError) as e:
        print('%s: error: %s' % (prog, e), file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json == '-':
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write('\n')
        return 0
    print(report(result), flush=True)
    if args.json:
        try:
            write_json(args.json, result)
        except OSError as e:
            print('%s: error: cannot write %s (%s)' % (prog, args.json, e), file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0
