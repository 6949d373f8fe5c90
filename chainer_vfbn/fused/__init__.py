"""The speed work: fast twins of definitions that live elsewhere in the package.

A GPU step of this package is bound by the host, by Chainer's Python cost per
function application, not by the GPU (docs/GPU.md). Each module here computes the
same numbers as a composed definition with fewer applications (and, on a GPU, fewer
kernel launches); the composed definition stays the reference, and a test holds
each twin equal to it:

- :mod:`chainer_vfbn.fused.unit`: the network's residual unit
  (:class:`chainer_vfbn.model.ResidualUnit`) as one node forward, one backward;
  its array work, Chainer's own on the CPU and fused CuPy kernels on a GPU, in
  :mod:`chainer_vfbn.fused.kernels`.
- :mod:`chainer_vfbn.fused.batchnorm`: batch normalisation whose double backward
  is one node (the BN links of every composed residual unit; v_f under eq. 3 when
  its units are composed).
- :mod:`chainer_vfbn.fused.vf_unit`, :mod:`chainer_vfbn.fused.vf_head` and
  :mod:`chainer_vfbn.fused.cross_entropy`: v_f's residual units, its head (pooling,
  fc and cross-entropy) and a cross-entropy of logits (differentiated twice, eq. 6
  and 3), each as one node forward, one first derivative, one second derivative.
- :mod:`chainer_vfbn.fused.reductions`: eq. 3's squared error (every synthesizer's
  loss) in one node forward and one backward, and global average pooling
  (v_f's and the network's head) in one node per derivative.
- The synthesizer's Adam in one update: :mod:`chainer_vfbn.adam`, beside
  :mod:`chainer_vfbn.sgd`, the network's optimizer.

Each fast path has a Chainer configuration key, on by default. Turn one off with
``chainer.using_config(KEY, False)`` to run the composed definition instead
(``benchmarks/bench_host.py`` times each lever that way).
"""
import chainer

#: The Chainer configuration keys of the fast paths, and their defaults.
SWITCHES = {
    'vfbn_fused_units': True,               # fused.unit for the network's units
    'vfbn_fused_bn_double_backward': True,  # fused.batchnorm in composed units' BN
    'vfbn_fused_v_f': True,                 # fused.vf_unit, vf_head, cross_entropy: v_f
    'vfbn_fused_reductions': True,          # fused.reductions: eq. 3, average pooling
    'vfbn_fused_adam': True,                # chainer_vfbn.adam for synthesizers (at build)
}
for _key, _value in SWITCHES.items():
    setattr(chainer.global_config, _key, _value)
