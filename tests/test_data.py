"""Tests of :mod:`chainer_vfbn.data`: the 36-view augmentation (SPEC section 5), the
CIFAR-10 and Fashion-MNIST readers (SPEC section 6) and the batch iterator.

The oracle for the views, :func:`reference_views`, is a slow, literal reading of
SPEC section 5 in plain NumPy slicing and Pillow, one view at a time. Within each
group of nine the crops are ordered with the y offset as the outer loop.
"""
import gzip
import os
import pickle
import shutil
import struct

import numpy
import pytest
from PIL import Image

import chainer_vfbn  # noqa: F401  (before chainer)
import chainer

from chainer_vfbn import data

pytestmark = pytest.mark.numpy1  # CI runs this file on NumPy 1.26 too

TOL = dict(rtol=1e-5, atol=1e-5)


def nearest_resize(channel, size):
    """One uint8 channel resized by Pillow's ``Image.NEAREST`` (what
    ``scipy.misc.imresize(..., 'nearest')`` called)."""
    img = Image.fromarray(numpy.ascontiguousarray(channel))
    assert img.mode == 'L'
    return numpy.asarray(img.resize((size, size), Image.Resampling.NEAREST))


def reference_views(image):
    """The 36 views of one uint8 (3, 32, 32) image, float64 (36, 3, 24, 24)."""
    views = []
    for oy in (0, 4, 8):
        for ox in (0, 4, 8):
            views.append(image[:, oy:oy + 24, ox:ox + 24])
    for oy in (0, 2, 4):
        for ox in (0, 2, 4):
            crop = image[:, oy:oy + 28, ox:ox + 28]
            views.append(numpy.stack([nearest_resize(c, 24) for c in crop]))
    views += [v[:, :, ::-1] for v in views]
    out = []
    for v in views:
        v = v.astype(numpy.float64)
        mean = v.mean(axis=(1, 2), keepdims=True)
        std = v.std(axis=(1, 2), keepdims=True)
        out.append((v - mean) / (std + 1e-5))
    return numpy.stack(out)


@pytest.fixture(scope='module')
def reference(tiny_images):
    return numpy.stack([reference_views(img) for img in tiny_images[0]])


# ---------------------------------------------------------------------------
# The 36 views.

def test_nearest_indices_match_pillow_on_an_index_ramp():
    """28 -> 24 (the 28x28 crops). Its sample centres (2j + 1) 7/12 are never whole
    numbers, so no tie can make Pillow's rounding differ."""
    ramp = numpy.tile(numpy.arange(28, dtype=numpy.uint8), (28, 1))
    by_pillow = Image.fromarray(ramp).resize((24, 24), Image.Resampling.NEAREST)
    by_pillow = numpy.asarray(by_pillow)
    indices = data._nearest_indices(24, 28)
    assert indices.shape == (24,)
    numpy.testing.assert_array_equal(indices, by_pillow[0])
    numpy.testing.assert_array_equal(data._nearest_indices(24, 24), numpy.arange(24))


def test_get_batch_equals_the_reference_for_all_36_views(tiny_images, reference):
    images, labels = tiny_images
    ds = data.AugmentedDataset(images, labels)
    assert len(ds) == 36 * len(images)
    x, t = ds.get_batch(numpy.arange(len(ds)))
    assert x.dtype == numpy.float32 and x.shape == (len(ds), 3, 24, 24)
    assert t.dtype == numpy.int32
    numpy.testing.assert_allclose(x, reference.reshape(-1, 3, 24, 24), **TOL)
    numpy.testing.assert_array_equal(t, numpy.repeat(labels, 36))


def test_getitem_maps_index_to_view_i_mod_36_of_image_i_div_36(tiny_images, reference):
    images, labels = tiny_images
    ds = data.AugmentedDataset(images, labels)
    rng = numpy.random.RandomState(5)
    for i in list(rng.permutation(len(ds))[:40]) + [0, 35, 36, len(ds) - 1]:
        x, t = ds[i]
        assert x.shape == (3, 24, 24)
        numpy.testing.assert_allclose(x, reference[i // 36, i % 36], **TOL)
        assert t == labels[i // 36]
    x_last, _ = ds[-1]
    numpy.testing.assert_allclose(x_last, reference[-1, 35], **TOL)
    pairs = ds[70:74]
    assert len(pairs) == 4
    for k, (x, t) in zip(range(70, 74), pairs):
        numpy.testing.assert_allclose(x, reference[k // 36, k % 36], **TOL)
        assert t == labels[k // 36]


def test_view_subsets(tiny_images, reference):
    """``views=(4,)`` is the centre 24x24 crop, one example per image."""
    images, labels = tiny_images
    centre = data.AugmentedDataset(images, labels, views=(4,))
    assert len(centre) == len(images)
    for i, img in enumerate(images):
        x, t = centre[i]
        crop = img[:, 4:28, 4:28].astype(numpy.float64)
        crop = ((crop - crop.mean(axis=(1, 2), keepdims=True))
                / (crop.std(axis=(1, 2), keepdims=True) + 1e-5))
        numpy.testing.assert_allclose(x, crop, **TOL)
        assert t == labels[i]
    two = data.AugmentedDataset(images, labels, views=(0, 27))
    assert len(two) == 2 * len(images)
    x, t = two.get_batch(numpy.arange(len(two)))
    numpy.testing.assert_allclose(x[0::2], reference[:, 0], **TOL)
    numpy.testing.assert_allclose(x[1::2], reference[:, 27], **TOL)
    numpy.testing.assert_array_equal(t, numpy.repeat(labels, 2))


def test_standardised_views_have_zero_mean_unit_std_per_channel(tiny_images):
    images, labels = tiny_images
    ds = data.AugmentedDataset(images, labels)
    x, _ = ds.get_batch(numpy.arange(len(ds)))
    x = x.astype(numpy.float64)
    numpy.testing.assert_allclose(x.mean(axis=(2, 3)), 0, atol=1e-5)
    # std / (std + 1e-5) with std ~ 74 for uniform uint8 pixels.
    numpy.testing.assert_allclose(x.std(axis=(2, 3)), 1, atol=1e-5)


def test_constant_image_standardises_to_zeros_not_nan():
    images = numpy.full((1, 3, 32, 32), 77, numpy.uint8)
    x, _ = data.AugmentedDataset(images, [3]).get_batch(numpy.arange(36))
    assert numpy.isfinite(x).all() and not x.any()


@pytest.mark.parametrize('images', [numpy.zeros((2, 3, 32, 32), numpy.float32),
                                    numpy.zeros((2, 32, 32, 3), numpy.uint8),
                                    numpy.zeros((2, 3, 28, 28), numpy.uint8)])
def test_rejects_images_that_are_not_uint8_nchw_32x32(images):
    with pytest.raises(ValueError):
        data.AugmentedDataset(images, [0, 1])


# ---------------------------------------------------------------------------
# CIFAR-10.

def expected_cifar(batches, names):
    """Images and labels as CIFAR-10's format defines them: per row the first 1024
    bytes are red, then green, then blue, each channel 32 rows of 32."""
    rows = numpy.concatenate([batches[n][0] for n in names])
    x = numpy.stack([numpy.stack([row[0:1024].reshape(32, 32),
                                  row[1024:2048].reshape(32, 32),
                                  row[2048:3072].reshape(32, 32)]) for row in rows])
    return x, numpy.array(sum((batches[n][1] for n in names), []))


def check_cifar(loaded, batches):
    (train_x, train_y), (test_x, test_y) = loaded
    assert train_x.shape == (100, 3, 32, 32) and train_x.dtype == numpy.uint8
    assert train_y.shape == (100,) and train_y.dtype == numpy.int32
    assert test_x.shape == (20, 3, 32, 32) and test_x.dtype == numpy.uint8
    assert test_y.shape == (20,) and test_y.dtype == numpy.int32
    x, y = expected_cifar(batches, ['data_batch_%d' % i for i in range(1, 6)])
    numpy.testing.assert_array_equal(train_x, x)
    numpy.testing.assert_array_equal(train_y, y)
    x, y = expected_cifar(batches, ['test_batch'])
    numpy.testing.assert_array_equal(test_x, x)
    numpy.testing.assert_array_equal(test_y, y)
    # The red channel of the first training image is the first 1024 bytes of its row.
    numpy.testing.assert_array_equal(train_x[0, 0].ravel(), batches['data_batch_1'][0][0, :1024])


def test_load_cifar10_from_the_archive(cifar_archive, cifar_batches):
    check_cifar(data.load_cifar10(cifar_archive), cifar_batches)


def test_load_cifar10_from_the_extracted_folder(cifar_folder, cifar_batches):
    check_cifar(data.load_cifar10(cifar_folder), cifar_batches)


def test_load_cifar10_from_parent_folders(cifar_archive, cifar_folder, cifar_batches):
    check_cifar(data.load_cifar10(os.path.dirname(cifar_archive)), cifar_batches)
    check_cifar(data.load_cifar10(os.path.dirname(cifar_folder)), cifar_batches)
    check_cifar(data.load('cifar10', cifar_archive), cifar_batches)


def write_bytes(path, blob):
    with open(str(path), 'wb') as f:
        f.write(blob)
    return str(path)


def test_truncated_archive_raises_data_error(tmp_path, cifar_archive):
    with open(cifar_archive, 'rb') as f:
        blob = f.read()
    path = write_bytes(tmp_path / 'cifar-10-python.tar.gz', blob[:len(blob) // 2])
    with pytest.raises(data.DataError, match='cifar-10-python.tar.gz'):
        data.load_cifar10(path)


def test_random_garbage_raises_data_error(tmp_path):
    garbage = numpy.random.RandomState(6).randint(0, 256, 5000).astype(numpy.uint8)
    path = write_bytes(tmp_path / 'cifar-10-python.tar.gz', garbage.tobytes())
    with pytest.raises(data.DataError) as err:
        data.load_cifar10(str(tmp_path))
    assert path in str(err.value)


def good_blobs(cifar_batches, cifar_writer):
    blob, _ = cifar_writer
    return {name: blob(*cifar_batches[name]) for name in cifar_batches}


def test_archive_without_test_batch_raises_data_error(tmp_path, cifar_batches, cifar_writer):
    blobs = good_blobs(cifar_batches, cifar_writer)
    del blobs['test_batch']
    path = cifar_writer[1](str(tmp_path / 'cifar-10-python.tar.gz'), blobs)
    with pytest.raises(data.DataError, match='test_batch'):
        data.load_cifar10(path)


@pytest.mark.parametrize('bad', ['not a dict', 'no data key', 'rows of 3000', 'labels short'])
def test_pickle_that_is_not_a_batch_raises_data_error(tmp_path, cifar_batches, cifar_writer,
                                                      bad):
    blobs = good_blobs(cifar_batches, cifar_writer)
    rows, labels = cifar_batches['test_batch']
    blobs['test_batch'] = {
        'not a dict': pickle.dumps([1, 2, 3], protocol=2),
        'no data key': pickle.dumps({b'labels': labels}, protocol=2),
        'rows of 3000': cifar_writer[0](rows[:, :3000], labels),
        'labels short': cifar_writer[0](rows, labels[:-1]),
    }[bad]
    path = cifar_writer[1](str(tmp_path / 'cifar-10-python.tar.gz'), blobs)
    with pytest.raises(data.DataError, match='test_batch'):
        data.load_cifar10(path)


def test_extracted_folder_missing_a_batch_raises_data_error(tmp_path, cifar_folder):
    folder = tmp_path / 'cifar-10-batches-py'
    shutil.copytree(cifar_folder, str(folder))
    os.remove(str(folder / 'data_batch_3'))
    with pytest.raises(data.DataError, match='data_batch_3'):
        data.load_cifar10(str(folder))


def test_missing_path_raises_data_error(tmp_path):
    missing = str(tmp_path / 'nowhere')
    with pytest.raises(data.DataError) as err:
        data.load_cifar10(missing)
    assert missing in str(err.value)


# ---------------------------------------------------------------------------
# Fashion-MNIST and the dataset registry.

def padded(images):
    """28x28 grayscale centred in 32x32 (2 black pixels each side), 3 equal channels."""
    out = numpy.zeros((len(images), 3, 32, 32), numpy.uint8)
    for c in range(3):
        out[:, c, 2:30, 2:30] = images
    return out


def test_load_fashion_mnist(fashion_mnist_folder):
    fake = fashion_mnist_folder
    (train_x, train_y), (test_x, test_y) = data.load_fashion_mnist(fake.path)
    assert train_x.dtype == numpy.uint8 and train_x.shape == (6, 3, 32, 32)
    assert test_x.dtype == numpy.uint8 and test_x.shape == (4, 3, 32, 32)
    assert train_y.dtype == numpy.int32 and test_y.dtype == numpy.int32
    numpy.testing.assert_array_equal(train_x, padded(fake.train_x))
    numpy.testing.assert_array_equal(test_x, padded(fake.test_x))
    numpy.testing.assert_array_equal(train_y, fake.train_y)
    numpy.testing.assert_array_equal(test_y, fake.test_y)
    (x, y), _ = data.load('fashion-mnist', fake.path)
    numpy.testing.assert_array_equal(x, train_x)


def test_fashion_mnist_bad_magic_number_raises_data_error(tmp_path, fashion_mnist_writer):
    fashion_mnist_writer(tmp_path, image_magic=0x0804)
    with pytest.raises(data.DataError, match='magic') as err:
        data.load_fashion_mnist(str(tmp_path))
    assert 'train-images-idx3-ubyte.gz' in str(err.value)


def test_fashion_mnist_truncated_file_raises_data_error(tmp_path, fashion_mnist_writer):
    """The header promises 4 images of 28x28; the file holds 100 bytes fewer."""
    fake = fashion_mnist_writer(tmp_path)
    header = struct.pack('>IIII', 0x803, 4, 28, 28)
    with gzip.open(str(tmp_path / 't10k-images-idx3-ubyte.gz'), 'wb') as f:
        f.write(header + fake.test_x.tobytes()[:-100])
    with pytest.raises(data.DataError, match='t10k-images-idx3-ubyte.gz'):
        data.load_fashion_mnist(str(tmp_path))


@pytest.mark.parametrize('keep', [(), ('train-images-idx3-ubyte.gz',)])
def test_fashion_mnist_missing_files_say_how_to_install(tmp_path, fashion_mnist_folder, keep):
    for name in keep:
        shutil.copy(os.path.join(fashion_mnist_folder.path, name), str(tmp_path))
    with pytest.raises(data.DataError, match='apt-get install dataset-fashion-mnist'):
        data.load_fashion_mnist(str(tmp_path))


def test_unknown_dataset_name_raises_data_error():
    with pytest.raises(data.DataError) as err:
        data.load('nope')
    assert 'cifar10' in str(err.value) and 'fashion-mnist' in str(err.value)


# ---------------------------------------------------------------------------
# BatchIterator.

class Recorder(object):
    """A dataset that remembers which example indices each batch asked for."""

    def __init__(self, dataset):
        self.dataset, self.seen = dataset, []

    def __len__(self):
        return len(self.dataset)

    def get_batch(self, indices):
        self.seen.append(numpy.array(indices))
        return self.dataset.get_batch(indices)


def test_batch_iterator_covers_each_example_once_per_epoch(tiny_images, reference):
    images, labels = tiny_images
    ds = Recorder(data.AugmentedDataset(images[:3], labels[:3]))
    numpy.random.seed(7)
    it = data.BatchIterator(ds, 10, repeat=False, shuffle=True)
    sizes = []
    for x, t in it:
        idx = ds.seen[-1]
        sizes.append(len(x))
        assert x.shape == (len(idx), 3, 24, 24) and x.dtype == numpy.float32
        numpy.testing.assert_allclose(x, reference[idx // 36, idx % 36], **TOL)
        numpy.testing.assert_array_equal(t, labels[idx // 36])
    assert sizes == [10] * 10 + [8]
    seen = numpy.concatenate(ds.seen)
    numpy.testing.assert_array_equal(numpy.sort(seen), numpy.arange(108))
    assert not (seen == numpy.arange(108)).all()  # shuffled
    assert it.epoch == 1


def test_batch_iterator_without_shuffle_is_in_order(tiny_images):
    images, labels = tiny_images
    ds = Recorder(data.AugmentedDataset(images[:1], labels[:1]))
    it = data.BatchIterator(ds, 8, repeat=True, shuffle=False)
    for _ in range(5):
        next(it)
    numpy.testing.assert_array_equal(numpy.concatenate(ds.seen),
                                     list(range(36)) + list(range(4)))
    assert it.epoch == 1 and it.is_new_epoch


def test_batch_iterator_resumes_the_same_order(tmp_path, tiny_images):
    """A snapshot taken mid-epoch resumes with the rest of that epoch's order."""
    images, labels = tiny_images
    base = data.AugmentedDataset(images[:3], labels[:3])
    numpy.random.seed(8)
    first = Recorder(base)
    it = data.BatchIterator(first, 12, repeat=True, shuffle=True)
    for _ in range(3):
        next(it)
    path = str(tmp_path / 'iterator.npz')
    chainer.serializers.save_npz(path, it)
    rest = [next(it) for _ in range(6)]
    assert it.is_new_epoch and it.epoch == 1

    numpy.random.seed(9)  # a different initial order, which the snapshot replaces
    second = Recorder(base)
    resumed = data.BatchIterator(second, 12, repeat=True, shuffle=True)
    chainer.serializers.load_npz(path, resumed)
    assert resumed.epoch == 0 and resumed.current_position == 36
    assert resumed.epoch_detail == pytest.approx(36 / 108.)
    for x, t in rest:
        x2, t2 = next(resumed)
        numpy.testing.assert_array_equal(x2, x)
        numpy.testing.assert_array_equal(t2, t)
    numpy.testing.assert_array_equal(numpy.concatenate(second.seen),
                                     numpy.concatenate(first.seen[3:9]))
    assert resumed.is_new_epoch and resumed.epoch == 1
    numpy.testing.assert_array_equal(numpy.sort(numpy.concatenate(first.seen[:9])),
                                     numpy.arange(108))
