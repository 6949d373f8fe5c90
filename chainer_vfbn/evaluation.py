"""Test error with the paper's test-time augmentation (appendix B.1, SPEC section 5):
every test image's 36 views go through the network, the logits are averaged and the
argmax is the prediction. The single-view error uses view 4 alone (the centre 24x24
crop, unflipped) and costs nothing extra when the 36 views are computed anyway.
"""
import chainer
import numpy

from chainer_vfbn import config
from chainer_vfbn.data import AugmentedDataset

CENTER_VIEW = 4  # 24x24 crop at offset (4, 4), not flipped


def predict_views(model, images, device, views=None, images_per_batch=16):
    """Logits of every view of every image: float32 ``(N, V, K)`` on the host."""
    dataset = AugmentedDataset(images, numpy.zeros(len(images), numpy.int32), views)
    V, out = dataset.n_views, []
    with chainer.using_config('train', False), chainer.no_backprop_mode():
        for start in range(0, len(images), images_per_batch):
            stop = min(start + images_per_batch, len(images))
            x, _ = dataset.get_batch(numpy.arange(start * V, stop * V))
            logits = model(device.send(x)).array
            out.append(chainer.backend.CpuDevice().send(logits).reshape(stop - start, V, -1))
    return numpy.concatenate(out)


def test_errors(model, images, labels, device, n_views=config.EVAL_VIEWS,
                images_per_batch=16):
    """``{'error': ..., 'error_single': ..., 'views': n}``, errors as fractions.

    With ``n_views=36`` ``error`` is the 36-view averaged error; with ``n_views=1``
    only the centre view is evaluated and both errors are the single-view error.
    """
    if n_views not in (1, config.N_VIEWS):
        raise ValueError('n_views must be 1 or %d, got %r' % (config.N_VIEWS, n_views))
    views = None if n_views == config.N_VIEWS else (CENTER_VIEW,)
    logits = predict_views(model, images, device, views, images_per_batch)
    labels = numpy.asarray(labels)
    single = logits[:, CENTER_VIEW if n_views > 1 else 0]
    return {
        'error': float((logits.mean(axis=1).argmax(axis=1) != labels).mean()),
        'error_single': float((single.argmax(axis=1) != labels).mean()),
        'views': n_views,
    }


def final_test_errors(model, images, labels, device, tta_images, images_per_batch=16):
    """The 36-view error over the first ``tta_images`` images and the centre-view
    error over all of them (both errors as fractions). The centre view of the first
    ``tta_images`` comes from the same 36-view pass. ``tta_images=0``: centre view
    only, and ``error`` is the centre-view error."""
    labels = numpy.asarray(labels)
    if tta_images == 0:
        return dict(test_errors(model, images, labels, device, 1, images_per_batch),
                    tta_images=0)
    views = predict_views(model, images[:tta_images], device, None, images_per_batch)
    centre = [views[:, CENTER_VIEW]]
    if tta_images < len(images):
        centre.append(predict_views(model, images[tta_images:], device, (CENTER_VIEW,),
                                    images_per_batch)[:, 0])
    centre = numpy.concatenate(centre)
    return {
        'error': float((views.mean(axis=1).argmax(axis=1) != labels[:tta_images]).mean()),
        'error_single': float((centre.argmax(axis=1) != labels).mean()),
        'views': config.N_VIEWS,
        'tta_images': tta_images,
    }


class TestErrorEvaluator(chainer.training.Extension):
    """Reports ``validation/main/error`` (36-view or single-view, see
    ``validation/main/views``) and ``validation/main/error_single``."""

    trigger = 1, 'epoch'
    priority = chainer.training.PRIORITY_WRITER
    name = 'validation'

    def __init__(self, model, images, labels, device, n_views=config.EVAL_VIEWS):
        self.model, self.images, self.labels = model, images, labels
        self.device, self.n_views = device, n_views
        self.last = None  # (iteration, result) of the latest evaluation

    def evaluate(self):
        return test_errors(self.model, self.images, self.labels, self.device,
                           self.n_views)

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
