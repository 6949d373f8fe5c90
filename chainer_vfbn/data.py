"""Data: CIFAR-10 and Fashion-MNIST as uint8 images, and the 36-view augmentation.

The chainer-cifar10 (2016) pipeline that the paper used (appendix B.1; SPEC section 5)
turns every 32x32 image into 36 views of 24x24:

* views 0-8: 24x24 crops at offsets (y, x) in {0, 4, 8}^2;
* views 9-17: 28x28 crops at offsets in {0, 2, 4}^2, resized to 24x24 by nearest
  neighbour sampling (as Pillow's ``Image.NEAREST``);
* views 18-35: views 0-17 flipped left-right;
* each view standardised per channel over its own pixels,
  ``(v - mean_c) / (std_c + 1e-5)``.

The original wrote the 1.8M views to disk; :class:`AugmentedDataset` computes them on
the fly instead, example ``i`` being view ``i % 36`` of image ``i // 36``. Because
crops, the nearest resize and flips all act on rows and columns separately, each view
is one gather through a precomputed table of 24x24 source pixels, and a whole batch is
built by :meth:`AugmentedDataset.get_batch` in a few vectorised NumPy calls.
"""
import gzip
import os
import pickle
import struct
import tarfile

import chainer
import numpy
from chainer.iterators import _statemachine

from chainer_vfbn import config

CIFAR_ARCHIVE = 'cifar-10-python.tar.gz'
CIFAR_FOLDER = 'cifar-10-batches-py'
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
DATASETS = ('cifar10', 'fashion-mnist')
#: Images in each training set (``--train-images`` may use fewer).
TRAIN_SIZES = {'cifar10': 50000, 'fashion-mnist': 60000}


class DataError(Exception):
    """A dataset could not be found or read; the message says what to do."""


# ---------------------------------------------------------------------------
# The 36 views.

def _nearest_indices(out_size, in_size):
    """Source index of each output pixel under Pillow's NEAREST resampling:
    the pixel whose area contains the output pixel's centre."""
    centres = (numpy.arange(out_size) + 0.5) * (in_size / float(out_size))
    return numpy.minimum(numpy.floor(centres).astype(numpy.int64), in_size - 1)


def view_table(size=32, out=config.INPUT_SIZE):
    """Rows and columns of the source image that make each of the 36 views.

    Returns ``(rows, cols)``, each ``(36, out)``: view ``v`` is
    ``image[:, rows[v][:, None], cols[v][None, :]]``.
    """
    rows, cols = [], []
    for crop, step in ((24, 4), (28, 2)):
        pick = _nearest_indices(out, crop)  # identity for the 24x24 crops
        for oy in (0, step, 2 * step):
            for ox in (0, step, 2 * step):
                rows.append(oy + pick)
                cols.append(ox + pick)
    rows = numpy.array(rows + rows)
    cols = numpy.array(cols + [c[::-1] for c in cols])  # views 18-35: flipped
    assert rows.max() < size and cols.max() < size
    return rows, cols


def standardize(views, eps=config.STANDARDIZE_EPS):
    """Per view and channel: ``(v - mean) / (std + eps)`` over the pixels
    (population std, centred before squaring)."""
    shape = views.shape
    v = views.reshape(shape[0] * shape[1], -1).astype(numpy.float32)
    v -= v.mean(axis=1, keepdims=True)
    std = numpy.sqrt(numpy.einsum('ij,ij->i', v, v) / v.shape[1])
    v /= (std + eps)[:, None]
    return v.reshape(shape)


class AugmentedDataset(object):
    """The 36 x N views of N uint8 images ``(N, 3, 32, 32)``, computed on the fly.

    ``dataset[i]`` is ``(view i % 36 of image i // 36, label)``; ``get_batch`` builds
    many at once. ``views`` restricts the set to some view indices (for example
    ``(4,)``, the centre 24x24 crop, for a cheap single-view evaluation).
    """

    def __init__(self, images, labels, views=None):
        images = numpy.asarray(images)
        if images.dtype != numpy.uint8 or images.ndim != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError('images must be uint8 (N, 3, 32, 32), got %s %s'
                             % (images.dtype, images.shape))
        self.images = images
        self.labels = numpy.asarray(labels, dtype=numpy.int32)
        self.views = numpy.arange(config.N_VIEWS) if views is None else numpy.asarray(views)
        rows, cols = view_table()
        # Index into one image (3*32*32 values) of every output value of every view.
        pixel = (rows[:, :, None] * 32 + cols[:, None, :]).reshape(len(rows), 1, -1)
        channel = (numpy.arange(3) * 32 * 32)[None, :, None]
        self._gather = (pixel + channel)[self.views]                  # (V, 3, 576)
        self._pixels = images.reshape(-1)

    @property
    def n_views(self):
        return len(self.views)

    def __len__(self):
        return len(self.images) * self.n_views

    def locate(self, indices):
        """Example indices -> (image indices, positions in ``self.views``)."""
        indices = numpy.asarray(indices)
        return indices // self.n_views, indices % self.n_views

    def get_batch(self, indices):
        """``(x, t)``: float32 ``(B, 3, 24, 24)`` views and int32 ``(B,)`` labels."""
        images, views = self.locate(indices)
        x = self._pixels.take(images[:, None, None] * (3 * 32 * 32) + self._gather[views])
        x = x.reshape(len(x), 3, config.INPUT_SIZE, config.INPUT_SIZE)
        return standardize(x), self.labels[images]

    def __getitem__(self, index):
        if isinstance(index, slice):
            x, t = self.get_batch(numpy.arange(len(self))[index])
            return list(zip(x, t))
        x, t = self.get_batch([index])
        return x[0], t[0]


# ---------------------------------------------------------------------------
# CIFAR-10.

def _read_cifar_batch(blob, name):
    try:
        d = pickle.loads(blob, encoding='bytes')
        data = numpy.asarray(d[b'data'], dtype=numpy.uint8).reshape(-1, 3, 32, 32)
        labels = numpy.asarray(d[b'labels'], dtype=numpy.int32)
    except Exception as e:
        raise DataError('%s is not a CIFAR-10 python batch (%s: %s)'
                        % (name, type(e).__name__, e))
    if len(data) != len(labels):
        raise DataError('%s: %d images but %d labels' % (name, len(data), len(labels)))
    return data, labels


_TRAIN_BATCHES = ['data_batch_%d' % i for i in range(1, 6)]


def load_cifar10(path):
    """Read CIFAR-10 from ``cifar-10-python.tar.gz`` or its extracted folder.

    ``path`` may be the archive, the ``cifar-10-batches-py`` folder, or a folder
    holding either. Returns ``((train_x, train_y), (test_x, test_y))`` as uint8
    ``(N, 3, 32, 32)`` and int32.
    """
    candidates = [path, os.path.join(path, CIFAR_FOLDER), os.path.join(path, CIFAR_ARCHIVE)]
    for p in candidates:
        if os.path.isdir(p) and os.path.exists(os.path.join(p, 'test_batch')):
            blobs = {}
            for name in _TRAIN_BATCHES + ['test_batch']:
                f = os.path.join(p, name)
                if not os.path.exists(f):
                    raise DataError('%s is missing from %s' % (name, p))
                with open(f, 'rb') as fh:
                    blobs[name] = fh.read()
            return _assemble_cifar(blobs, p)
        if os.path.isfile(p):
            return _assemble_cifar(_read_cifar_tar(p), p)
    raise DataError('no CIFAR-10 at %s: give --data-dir the %s archive or its '
                    'extracted %s folder' % (path, CIFAR_ARCHIVE, CIFAR_FOLDER))


def _read_cifar_tar(path):
    blobs = {}
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for member in tar.getmembers():
                name = os.path.basename(member.name)
                if name in _TRAIN_BATCHES + ['test_batch']:
                    blobs[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError('%s is not a readable cifar-10-python.tar.gz (%s); '
                        'download it again' % (path, e))
    missing = [n for n in _TRAIN_BATCHES + ['test_batch'] if n not in blobs]
    if missing:
        raise DataError('%s lacks %s: not a complete cifar-10-python.tar.gz'
                        % (path, ', '.join(missing)))
    return blobs


def _assemble_cifar(blobs, where):
    parts = [_read_cifar_batch(blobs[n], os.path.join(where, n)) for n in _TRAIN_BATCHES]
    train = (numpy.concatenate([p[0] for p in parts]),
             numpy.concatenate([p[1] for p in parts]))
    return train, _read_cifar_batch(blobs['test_batch'], os.path.join(where, 'test_batch'))


def download_cifar10():
    """CIFAR-10 through Chainer's downloader and cache (needs the internet once)."""
    try:
        train, test = chainer.datasets.get_cifar10(withlabel=True, ndim=3, scale=255.)
    except Exception as e:
        raise DataError(
            'could not download CIFAR-10 (%s: %s). Give a local copy with '
            '--data-dir PATH (the %s archive or its extracted folder), or run on '
            'data available offline with --dataset fashion-mnist'
            % (type(e).__name__, str(e).splitlines()[0] if str(e) else '', CIFAR_ARCHIVE))

    def to_uint8(ds):
        x, y = ds._datasets
        return numpy.rint(x).astype(numpy.uint8), y.astype(numpy.int32)
    return to_uint8(train), to_uint8(test)


# ---------------------------------------------------------------------------
# Fashion-MNIST.

def _read_idx(path, ndim):
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
        magic, = struct.unpack('>I', raw[:4])
        if magic != 0x0800 + ndim:
            raise ValueError('magic number %#x, expected %#x' % (magic, 0x800 + ndim))
        dims = struct.unpack('>' + 'I' * ndim, raw[4:4 + 4 * ndim])
        data = numpy.frombuffer(raw, numpy.uint8, offset=4 + 4 * ndim)
        return data.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise DataError('%s is not a readable idx.gz file (%s)' % (path, e))


def fashion_mnist_to_cifar_shape(images):
    """28x28 grayscale -> 32x32x3: pad 2 black pixels on each side, repeat the
    channel three times. The network and the 36 views then apply unchanged."""
    images = numpy.pad(images, ((0, 0), (2, 2), (2, 2)))
    return numpy.repeat(images[:, None], 3, axis=1)


def load_fashion_mnist(path=FASHION_MNIST_DIR):
    """Read the four Fashion-MNIST idx ``.gz`` files from a folder."""
    out = []
    for split in ('train', 'test'):
        img_file, lbl_file = (os.path.join(path, f) for f in FASHION_MNIST_FILES[split])
        for f in (img_file, lbl_file):
            if not os.path.exists(f):
                raise DataError(
                    '%s not found. Install Fashion-MNIST with `apt-get install '
                    'dataset-fashion-mnist` (it goes to %s) or give the folder with '
                    'its four idx .gz files through --data-dir' % (f, FASHION_MNIST_DIR))
        x, y = _read_idx(img_file, 3), _read_idx(lbl_file, 1)
        if len(x) != len(y):
            raise DataError('%s: %d images but %d labels' % (path, len(x), len(y)))
        out.append((fashion_mnist_to_cifar_shape(x), y.astype(numpy.int32)))
    return tuple(out)


def load(dataset, data_dir=None):
    """``((train_x, train_y), (test_x, test_y))`` for a dataset name."""
    if dataset == 'cifar10':
        return load_cifar10(data_dir) if data_dir else download_cifar10()
    if dataset == 'fashion-mnist':
        return load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
    raise DataError('unknown dataset %r; choose one of: %s' % (dataset, ', '.join(DATASETS)))


# ---------------------------------------------------------------------------
# Iteration.

class ArrayDataset(object):
    """Examples ``x`` (any shape after the first axis) with integer labels ``t``,
    batched by :class:`BatchIterator`: the dataset of your own arrays."""

    def __init__(self, x, t):
        if len(x) != len(t):
            raise ValueError('x and t differ in length: %d and %d' % (len(x), len(t)))
        self.x, self.t = x, numpy.asarray(t, numpy.int32)

    def __len__(self):
        return len(self.x)

    def get_batch(self, indices):
        return self.x[indices], self.t[indices]


class BatchIterator(chainer.iterators.SerialIterator):
    """:class:`chainer.iterators.SerialIterator` that asks the dataset for a whole
    batch at once (``dataset.get_batch(indices)`` -> ``(x, t)``) instead of one
    example at a time; order, epochs and snapshots are SerialIterator's.

    ``BatchIterator(dataset, batch_size, repeat=True, shuffle=None,
    order_sampler=None)``: without an ``order_sampler`` it shuffles with NumPy's
    global generator (``numpy.random.seed`` fixes it); give
    ``chainer.iterators.ShuffleOrderSampler(numpy.random.RandomState(seed))`` for a
    generator of its own (``train.py`` uses a seeded sampler that a snapshot can
    resume exactly)."""

    def __next__(self):
        self._previous_epoch_detail = self.epoch_detail
        self._state, indices = _statemachine.iterator_statemachine(
            self._state, self.batch_size, self.repeat, self.order_sampler,
            len(self.dataset))
        if indices is None:
            raise StopIteration
        return self.dataset.get_batch(indices)

    next = __next__

