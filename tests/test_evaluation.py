"""Progress lines of the test passes (a final 36-view test takes many minutes on a CPU)."""
import io

import chainer
import numpy

import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
from chainer_vfbn import evaluation


def first_pixels(x):
    """A stand-in network: the logits are the first 10 values of each view."""
    return chainer.Variable(x.reshape(len(x), -1)[:, :10])


def test_final_test_reports_each_pass_in_images_done():
    rng = numpy.random.RandomState(0)
    images = rng.randint(0, 256, (40, 3, 32, 32)).astype(numpy.uint8)
    labels = rng.randint(0, 10, 40)
    out = io.StringIO()
    evaluation.final_test_errors(first_pixels, images, labels, chainer.get_device('@numpy'),
                                 tta_images=8, images_per_batch=16,
                                 progress=evaluation.PassProgress(out, seconds=0))
    lines = out.getvalue().splitlines()
    done = [line.split(': ')[1].split(' images')[0] for line in lines]
    assert done == ['8/8', '16/32', '32/32']
    assert lines[0].startswith('[progress] test, 36 views of images 1-8: ')
    assert lines[1].startswith('[progress] test, centre view of images 9-40: ')
    assert all(line.endswith(' min left') for line in lines)


def test_a_pass_shorter_than_the_interval_says_nothing():
    out = io.StringIO()
    progress = evaluation.PassProgress(out, seconds=3600)
    for done in range(0, 100, 10):
        progress('test', done, 100)
    assert out.getvalue() == ''
