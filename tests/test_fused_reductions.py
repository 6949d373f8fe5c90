"""Eq. 3's squared error and global average pooling in few nodes
(:mod:`chainer_vfbn.fused.reductions`) against their composed definitions
(``synthesizers.squared_error``, ``F.average``) and against closed forms.

The fused nodes do the composed functions' array operations in order, so the
comparisons with them are exact (``assert_array_equal``), forward and every
derivative, in float32 and float64, with a batch whose 1/B is not a power of two.
The closed forms (``sum((a - b)^2) / B``, ``2 (a - b) / B``; the mean, ``gy / HW``,
``sum(G) / HW``) are evaluated in float64 NumPy.
"""
import chainer_vfbn  # noqa: F401  (the NumPy-2 shim precedes `import chainer`)
import chainer
import chainer.functions as F
import numpy
import pytest

from chainer_vfbn import model, synthesizers
from conftest import Applications

SWITCH = 'vfbn_fused_reductions'


def squared_error_run(a, b, fused, b_needs_grad):
    a = chainer.Variable(a.copy())
    b = chainer.Variable(b.copy(), requires_grad=b_needs_grad)
    hook = Applications()
    with chainer.using_config(SWITCH, fused), hook:
        e = synthesizers.squared_error(a, b)
        e.backward()
    return e.array, a.grad, b.grad, hook.labels


@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
@pytest.mark.parametrize('shape', [(3, 4, 2, 2), (3, 5), (4, 2)])
@pytest.mark.parametrize('b_needs_grad', [False, True])
def test_squared_error_is_the_composed_one_bit_for_bit(dtype, shape, b_needs_grad):
    rng = numpy.random.RandomState(sum(shape))
    a, b = rng.randn(*shape).astype(dtype), rng.randn(*shape).astype(dtype)
    *composed, composed_labels = squared_error_run(a, b, False, b_needs_grad)
    *fused, fused_labels = squared_error_run(a, b, True, b_needs_grad)
    for want, got in zip(composed, fused):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        numpy.testing.assert_array_equal(got, want)
    assert len(composed_labels) == 9 if b_needs_grad else 8
    assert fused_labels == ['SquaredError', 'SquaredErrorGrad']
    # The closed form, in float64.
    e, ga, gb = fused
    d = a.astype(numpy.float64) - b
    tol = dict(rtol=1e-5 if dtype == numpy.float32 else 1e-12)
    numpy.testing.assert_allclose(e, (d * d).sum() / shape[0], **tol)
    numpy.testing.assert_allclose(ga, 2 * d / shape[0], **tol)
    if b_needs_grad:
        numpy.testing.assert_allclose(gb, -2 * d / shape[0], **tol)


def test_squared_error_refuses_a_second_derivative():
    a = chainer.Variable(numpy.ones((2, 3), numpy.float32))
    e = synthesizers.squared_error(a, numpy.zeros((2, 3), numpy.float32))
    ga, = chainer.grad([e], [a], enable_double_backprop=True)
    with pytest.raises(RuntimeError, match=r"using_config\('vfbn_fused_reductions', False\)"):
        F.sum(ga).backward()


def average_run(x, gy, G, fused):
    """Forward, first derivative (for ``gy``) and the derivative of
    ``sum(G * dL/dx)`` w.r.t. ``x`` and ``gy`` (what eq. 3 asks of v_f's pooling)."""
    x = chainer.Variable(x.copy())
    gy = chainer.Variable(gy.copy())
    hook = Applications()
    with chainer.using_config(SWITCH, fused), hook:
        y = model.global_average_pooling(x)
        gx, = chainer.grad([y], [x], grad_outputs=[gy], enable_double_backprop=True)
        F.sum(gx * G).backward()
    return y.array, gx.array, gy.grad, hook.labels, gx.array.strides


@pytest.mark.parametrize('dtype', [numpy.float32, numpy.float64])
@pytest.mark.parametrize('shape', [(3, 4, 3, 3), (2, 5, 8, 8), (3, 2, 1, 1)])
def test_global_average_is_the_composed_one_bit_for_bit(dtype, shape):
    rng = numpy.random.RandomState(sum(shape))
    x = rng.randn(*shape).astype(dtype)
    gy = rng.randn(*shape[:2]).astype(dtype)
    G = rng.randn(*shape).astype(dtype)
    *composed, composed_labels, composed_strides = average_run(x, gy, G, False)
    *fused, fused_labels, fused_strides = average_run(x, gy, G, True)
    for want, got in zip(composed, fused):
        assert got.dtype == want.dtype and got.shape == want.shape
        numpy.testing.assert_array_equal(got, want)
    assert fused_strides == composed_strides       # the broadcast view, as Chainer's
    assert fused_labels.count('GlobalAverage') == 1
    assert fused_labels.count('GlobalAverageGrad') == 1
    assert fused_labels.count('GlobalAverageGradGrad') == 1
    # Composed: Mean; * (1/HW), reshape, broadcast_to; sum_to, reshape, * (1/HW)
    # (with 1 x 1 maps, broadcast_to and sum_to change nothing and are skipped).
    assert len(composed_labels) - len(fused_labels) == (2 if shape[2:] == (1, 1) else 4)
    # The closed forms, in float64.
    y, gx, ggy = fused
    hw = shape[2] * shape[3]
    tol = dict(rtol=1e-5 if dtype == numpy.float32 else 1e-12)
    numpy.testing.assert_allclose(y, x.astype(numpy.float64).sum(axis=(2, 3)) / hw, **tol)
    numpy.testing.assert_allclose(gx, numpy.broadcast_to(gy[:, :, None, None] / hw, shape),
                                  **tol)
    numpy.testing.assert_allclose(ggy, G.astype(numpy.float64).sum(axis=(2, 3)) / hw,
                                  **tol)


def test_global_average_refuses_a_third_derivative():
    x = chainer.Variable(numpy.ones((2, 3, 2, 2), numpy.float32))
    y = model.global_average_pooling(x)
    gx, = chainer.grad([F.sum(y * y)], [x], enable_double_backprop=True)
    ggx, = chainer.grad([F.sum(gx * gx)], [x], enable_double_backprop=True)
    with pytest.raises(RuntimeError, match=r"using_config\('vfbn_fused_reductions', False\)"):
        F.sum(ggx).backward()
