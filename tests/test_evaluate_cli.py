"""``evaluate.py`` end to end: it reproduces ``result.json``'s test errors from the
saved weights (a predictor or a trainer snapshot, of every snapshot layout), on the
run's own test images and views or others, and refuses weights of another network.
The runs are ``test_cli.py``'s tiny ones (the session's ``trained`` fixture of
``conftest.py``, each trained once)."""
import json
import os

import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
import pytest

from conftest import (assert_one_error_line, read_json, row_id, script, short_run,
                      table1_row)


def test_lr_drops_threads_and_final_errors_on_two_test_sets(trained):
    """--lr-drops 2 3: iteration i+1 uses the lr dropped after iteration i (the log
    gives the lr each iteration used); --threads is recorded; the final 36-view error
    is that of the first --tta-images test images and the centre-view error that of
    all, each checked by evaluate.py through the plain whole-set evaluation."""
    out, proc = trained('--synth', 'vfbn', '--iterations', 4, '--lr-drops', 2, 3,
                        '--eval-every', 1, '--eval-views', 1, '--eval-images', 4,
                        '--tta-images', 3, '--threads', 1)
    assert proc.returncode == 0, proc.stderr
    log = read_json(os.path.join(out, 'log'))
    assert [e['lr'] for e in log] == pytest.approx([0.1, 0.1, 0.01, 0.001], rel=1e-12)
    assert read_json(os.path.join(out, 'args.json'))['threads'] == 1
    result = read_json(os.path.join(out, 'result.json'))
    assert (result['eval_views'], result['tta_images'], result['test_images']) == (36, 3, 8)
    tta = evaluate_json(out, '--test-images', 3, '--views', 36)
    assert tta['test_error'] == result['test_error']
    centre = evaluate_json(out, '--views', 1)
    assert centre['test_images'] == 8
    assert centre['test_error'] == result['test_error_single']
    again = evaluate_json(out)  # the run's own settings: the same two numbers
    assert (again['test_error'], again['test_error_single']) == \
        (result['test_error'], result['test_error_single'])


# ---------------------------------------------------------------------------
# (f) evaluate.py reproduces result.json.

def evaluate_json(*argv):
    proc = script('evaluate.py', *argv, '--json', '-')
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize('row', [table1_row('bp'), table1_row('bottom'),
                                 table1_row('vfbn', 1e-3)], ids=row_id)
def test_evaluate_matches_result_json(trained, row):
    """The predictor's model.npz and the trainer snapshot of the same iteration give
    result.json's errors exactly, for each snapshot layout (``model:main`` for bp
    and bottom, ``model:lower`` + ``model:upper`` for the split methods)."""
    out, proc = trained(*short_run(row))
    assert proc.returncode == 0, proc.stderr
    result = read_json(os.path.join(out, 'result.json'))
    keys = ('test_error', 'test_error_single', 'eval_views', 'test_images', 'iteration')

    from_model = evaluate_json(out)
    assert from_model['weights_kind'] == 'predictor'
    assert {k: from_model[k] for k in keys} == {k: result[k] for k in keys}

    from_snapshot = evaluate_json(os.path.join(out, 'snapshot_iter_3'))
    assert from_snapshot['weights_kind'] == 'trainer snapshot'
    assert {k: from_snapshot[k] for k in keys} == {k: result[k] for k in keys}


def test_evaluate_text_and_json_file(trained, tmp_path):
    out, _ = trained(*short_run(table1_row('vfbn', 1e-3)))
    result = read_json(os.path.join(out, 'result.json'))
    target = tmp_path / 'eval.json'
    proc = script('evaluate.py', out, '--json', target)
    assert proc.returncode == 0, proc.stderr
    assert 'test error %.2f%% (36-view), %.2f%% (single view)' % (
        100 * result['test_error'], 100 * result['test_error_single']) in proc.stdout
    written = read_json(str(target))
    assert written['test_error'] == result['test_error']
    assert sorted(os.listdir(tmp_path)) == ['eval.json']  # no temporary left behind


def test_evaluate_single_view_from_extracted_folder(trained, cifar_folder):
    """``--views 1`` evaluates the centre view alone, which is the view behind
    result.json's single-view error; ``--data-dir`` reads the same test images from
    the extracted folder."""
    out, _ = trained(*short_run(table1_row('vfbn', 1e-3)))
    result = read_json(os.path.join(out, 'result.json'))
    single = evaluate_json(out, '--views', 1, '--data-dir', cifar_folder)
    assert single['eval_views'] == 1
    assert single['test_images'] == result['test_images']
    assert single['test_error'] == single['test_error_single'] == result['test_error_single']


def test_evaluate_mid_run_snapshot(trained):
    """Iteration 3 of a 6-iteration run: ``--snapshot`` names a file in the run
    folder; the trainer snapshot and the predictor saved beside it agree."""
    out, proc = trained(*short_run(table1_row('vfbn', 1e-3), iterations=6))
    assert proc.returncode == 0, proc.stderr
    a = evaluate_json(out, '--snapshot', 'snapshot_iter_3')
    b = evaluate_json(out, '--snapshot', 'model_iter_3.npz')
    assert a['iteration'] == b['iteration'] == 3
    for k in ('test_error', 'test_error_single'):
        assert a[k] == b[k]


@pytest.mark.parametrize('other', ['depth-2', 'bp-snapshot', 'bottom-model'])
def test_evaluate_refuses_another_architecture(trained, tmp_path, other):
    vfbn, _ = trained(*short_run(table1_row('vfbn', 1e-3)))
    if other == 'depth-2':
        run, proc = trained('--synth', 'vfbn', '--iterations', 1, '--depth', 2)
        weights = os.path.join(run, 'model.npz')
    elif other == 'bp-snapshot':
        run, proc = trained(*short_run(table1_row('bp')))
        weights = os.path.join(run, 'snapshot_iter_3')
    else:
        run, proc = trained(*short_run(table1_row('bottom')))
        weights = os.path.join(run, 'model.npz')
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / 'eval.json'
    proc = script('evaluate.py', vfbn, '--snapshot', weights, '--json', target)
    line = assert_one_error_line(proc, 'evaluate.py')
    assert 'does not hold the network that' in line
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize('case', ['missing', 'no-args-json'])
def test_evaluate_bad_path(tmp_path, case):
    path = tmp_path / 'nowhere'
    if case == 'no-args-json':
        path.mkdir()
        (path / 'model.npz').write_bytes(b'')
    proc = script('evaluate.py', path)
    line = assert_one_error_line(proc, 'evaluate.py')
    assert str(path) in line
