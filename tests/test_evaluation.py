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


# ---------------------------------------------------------------------------
# The test errors against a case counted by hand.

def marked_images(kinds):
    """32x32 images whose centre view (the 24x24 crop at (4, 4), unflipped) a
    network can recognise from its pixels alone: channels 0 and 1 are black but for
    a bright pixel at (4, 4) and a dim one at (4, 27), so in that view alone the
    brightest pixel is the top-left one and the top-right one is not black (flipped,
    shifted or resized views put them elsewhere). Channel 2 says the image's kind:
    'A' a random pattern, 'B' black."""
    rng = numpy.random.RandomState(5)
    images = numpy.zeros((len(kinds), 3, 32, 32), numpy.uint8)
    images[:, :2, 4, 4], images[:, :2, 4, 27] = 255, 128
    for i, kind in enumerate(kinds):
        if kind == 'A':
            images[i, 2] = rng.randint(0, 256, (32, 32))
    return images


class KnownLogits(object):
    """A network with known logits per view. A-images: the centre view 40 on class
    1, every other view 1 on class 2; B-images: the centre view 1.5 on class 3, the
    others 1 on class 2. It counts the centre views it has seen."""

    def __init__(self):
        self.centres = 0

    def __call__(self, x):
        logits = numpy.zeros((len(x), 10), numpy.float32)
        for i, view in enumerate(x):
            top = view[0]
            centre = top[0, 0] == top.max() and (top == top.max()).sum() == 1 and \
                top[0, 23] > top.min()
            kind_a = view[2].max() > view[2].min()
            self.centres += centre
            if centre:
                logits[i, 1 if kind_a else 3] = 40 if kind_a else 1.5
            else:
                logits[i, 2] = 1
        return chainer.Variable(logits)


def test_test_errors_are_the_errors_counted_by_hand():
    """Per image (kind, label): the 36-view prediction is the argmax of the mean of
    the 36 logit vectors: class 1 for an A-image (40/36 > 35/36; averaging softmaxes
    or voting would give 2), class 2 for a B-image (35/36 > 1.5/36; the largest
    logit of any view would give 3); the centre view's is 1 (A) or 3 (B).

    ====== ===== ===== ======= ======
    image  kind  label 36-view centre
    ====== ===== ===== ======= ======
    0      A     1     right   right
    1      A     2     wrong   wrong
    2      B     2     right   wrong
    3      B     3     wrong   right
    4      B     2     right   wrong
    5      A     1     right   right
    ====== ===== ===== ======= ======

    36-view error 2/6, centre-view error 3/6; the 36-view error of the first 3
    images 1/3 (with the centre view of all 6 still 3/6)."""
    images = marked_images('AABBBA')
    labels = numpy.array([1, 2, 2, 3, 2, 1], numpy.int32)
    cpu = chainer.get_device('@numpy')
    net = KnownLogits()
    errors = evaluation.test_errors(net, images, labels, cpu, 36, images_per_batch=4)
    assert net.centres == 6  # one centre view per image among its 36
    assert (errors['error'], errors['error_single'], errors['views']) == (2 / 6, 3 / 6, 36)

    net = KnownLogits()
    final = evaluation.final_test_errors(net, images, labels, cpu, tta_images=3,
                                         images_per_batch=2)
    assert net.centres == 6  # 3 in the 36-view pass, 3 in the centre-view pass
    assert (final['error'], final['error_single'], final['tta_images']) == (1 / 3, 3 / 6, 3)

    net = KnownLogits()
    single = evaluation.test_errors(net, images, labels, cpu, 1)
    assert net.centres == 6  # every view it was given was a centre view
    assert (single['error'], single['error_single'], single['views']) == (3 / 6, 3 / 6, 1)
