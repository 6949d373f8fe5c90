"""Test error with the paper's test-time augmentation (appendix B.1, SPEC section 5):
every test image's 36 views go through the network, the logits are averaged and the
argmax is the prediction. The single-view error uses view 4 alone (the centre 24x24
crop, unflipped) and costs nothing extra when the 36 views are computed anyway.
"""
import sys
import time

import chainer
import numpy

from chainer_vfbn import config
from chainer_vfbn.data import AugmentedDataset

CENTER_VIEW = 4  # 24x24 crop at offset (4, 4), not flipped


class PassProgress(object):
    """A plain line on ``out`` every ``seconds`` while a pass over the test images
    runs (``[progress] test, 36 views of images 1-2000: 640/2000 images, 9 min
    left``): a final 36-view test on a CPU takes many minutes."""

    def __init__(self, out=sys.stdout, seconds=60.0):
        self.out, self.seconds = out, seconds
        self.label = None

    def __call__(self, label, done, total):
        now = time.monotonic()
        if label != self.label or done == 0:
            self.label, self.start, self.last = label, now, now
        elif now - self.last >= self.seconds:
            self.last = now
            left = (total - done) * (now - self.start) / done
            print('[progress] %s: %d/%d images, %.0f min left' % (label, done, total, left / 60),
                  file=self.out, flush=True)


def predict_views(model, images, device, views=None, images_per_batch=16, progress=None,
                  label='test'):
    """Logits of every view of every image: float32 ``(N, V, K)`` on the host.
    ``progress(label, images done, images)`` is called before the pass and after each
    batch."""
    dataset = AugmentedDataset(images, numpy.zeros(len(images), numpy.int32), views)
    V, out = dataset.n_views, []
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for start in range(0, len(images), images_per_batch):
            if progress is not None:
                progress(label, start, len(images))
            stop = min(start + images_per_batch, len(images))
            x, _ = dataset.get_batch(numpy.arange(start * V, stop * V))
            logits = model(device.send(x)).array
            out.append(chainer.backend.CpuDevice().send(logits).reshape(stop - start, V, -1))
    if progress is not None:
        progress(label, len(images), len(images))
    return numpy.concatenate(out)


def test_errors(model, images, labels, device, n_views=config.EVAL_VIEWS,
                images_per_batch=16, progress=None):
    """``{'error': ..., 'error_single': ..., 'views': n}``, errors as fractions.

    With ``n_views=36`` ``error`` is the 36-view averaged error; with ``n_views=1``
    only the centre view is evaluated and both errors are the single-view error.
    """
    if n_views not in (1, config.N_VIEWS):
        raise ValueError('n_views must be 1 or %d, got %r' % (config.N_VIEWS, n_views))
    views = None if n_views == config.N_VIEWS else (CENTER_VIEW,)
    logits = predict_views(model, images, device, views, images_per_batch, progress,
                           'test, %s' % ('36 views' if views is None else 'centre view'))
    labels = numpy.asarray(labels)
    single = logits[:, CENTER_VIEW if n_views > 1 else 0]
    return {
        'error': float((logits.mean(axis=1).argmax(axis=1) != labels).mean()),
        'error_single': float((single.argmax(axis=1) != labels).mean()),
        'views': n_views,
    }


def final_test_errors(model, images, labels, device, tta_images, images_per_batch=16,
                      progress=None):
    """The 36-view error over the first ``tta_images`` images and the centre-view
    error over all of them (both errors as fractions). The centre view of the first
    ``tta_images`` comes from the same 36-view pass. ``tta_images=0``: centre view
    only, and ``error`` is the centre-view error. ``progress``: as
    :func:`predict_views`'s."""
    labels = numpy.asarray(labels)
    if tta_images == 0:
        return dict(test_errors(model, images, labels, device, 1, images_per_batch,
                                progress), tta_images=0)
    views = predict_views(model, images[:tta_images], device, None, images_per_batch,
                          progress, 'test, 36 views of images 1-%d' % tta_images)
    centre = [views[:, CENTER_VIEW]]
    if tta_images < len(images):
        centre.append(predict_views(
            model, images[tta_images:], device, (CENTER_VIEW,), images_per_batch, progress,
            'test, centre view of images %d-%d' % (tta_images + 1, len(images)))[:, 0])
    centre = numpy.concatenate(centre)
    return {
        'error': float((views.mean(axis=1).argmax(axis=1) != labels[:tta_images]).mean()),
        'error_single': float((centre.argmax(axis=1) != labels).mean()),
        'views': config.N_VIEWS,
        'tta_images': tta_images,
    }


class TestErrorEvaluator(chainer.training.Extension):
    """Reports ``validation/main/error`` (36-view or single-view, see
    ``validation/main/views``) and ``validation/main/error_single``; ``progress`` as
    :func:`predict_views`'s."""

    trigger = 1, 'epoch'
    priority = chainer.training.PRIORITY_WRITER
    name = 'validation'

    def __init__(self, model, images, labels, device, n_views=config.EVAL_VIEWS,
                 progress=None):
        self.model, self.images, self.labels = model, images, labels
        self.device, self.n_views, self.progress = device, n_views, progress
        self.last = None  # (iteration, result) of the latest evaluation

    def evaluate(self):
        return test_errors(self.model, self.images, self.labels, self.device,
                           self.n_views, progress=self.progress)

    def __call__(self, trainer):
        result = self.evaluate()
        self.last = (trainer.updater.iteration, result)
        chainer.report({'validation/main/' + k: v for k, v in result.items()})
        return result

    def final(self, trainer):
        """The test errors at the trainer's current iteration (reusing the last
        evaluation when it was made there)."""
        if self.last is None or self.last[0] != trainer.updater.iteration:
            self.last = (trainer.updater.iteration, self.evaluate())
        return self.last[1]
