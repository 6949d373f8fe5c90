"""Choosing a pipeline's cuts (``--balance``, :mod:`chainer_vfbn.balance`): the
module times add up the measured parts as the docstring says, and the chosen cuts
are the best ones, checked against trying every possible set of cuts."""
import itertools

import numpy
import pytest

from chainer_vfbn import balance


def costs(units, stem=0.5, head=0.25, synth=None):
    synth = [0.125 * (s + 1) for s in range(len(units) + 1)] if synth is None else synth
    return stem, list(units), head, synth


def test_a_module_is_its_units_plus_the_stem_below_and_a_synthesizer_or_the_head_above():
    c = costs([1.0, 2.0, 4.0, 8.0])   # synth at cut s: 0.125 (s + 1)
    assert balance.module_time(c, 0, 2, False) == 0.5 + 1 + 2 + 0.375
    assert balance.module_time(c, 2, 3, False) == 4 + 0.5
    assert balance.module_time(c, 3, 4, True) == 8 + 0.25
    assert balance.module_time(c, 0, 0, False) == 0.5 + 0.125   # the stem alone
    assert balance.module_time(c, 4, 4, True) == 0.25            # the head alone


def brute_force(c, modules):
    """The smallest largest module time over every increasing set of cuts."""
    n = len(c[1])
    best = None
    for cuts in itertools.combinations(range(n + 1), modules - 1):
        bounds = (0,) + cuts + (n,)
        worst = max(balance.module_time(c, a, b, i == modules - 1)
                    for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('modules', [2, 3, 4])
def test_the_chosen_cuts_are_the_best_of_all(seed, modules):
    rng = numpy.random.RandomState(seed)
    n = int(rng.randint(3, 9))
    c = costs(rng.uniform(0.1, 2, n), stem=rng.uniform(0, 1), head=rng.uniform(0, 1),
              synth=list(rng.uniform(0, 3, n + 1)))
    cuts, worst = balance.best_cuts(c, modules)
    assert len(cuts) == modules - 1 and sorted(set(cuts)) == cuts
    bounds = [0] + cuts + [n]
    assert worst == max(balance.module_time(c, a, b, i == modules - 1)
                        for i, (a, b) in enumerate(zip(bounds, bounds[1:])))
    assert worst == pytest.approx(brute_force(c, modules), rel=0, abs=1e-12)


def test_an_expensive_synthesizer_moves_the_cut_to_where_it_is_cheap():
    # Four equal units; the synthesizer costs 3 everywhere but after unit 3.
    c = costs([1.0] * 4, stem=0.0, head=0.0, synth=[3.0, 3.0, 3.0, 0.0, 3.0])
    assert balance.best_cuts(c, 2) == ([3], 3.0)


def test_more_modules_than_boundaries_is_refused():
    with pytest.raises(ValueError, match='5 modules do not fit a network of 3 units'):
        balance.best_cuts(costs([1.0] * 3), 5)


def test_stage_costs_times_every_part_of_a_small_network():
    stem, units, head, synth = balance.stage_costs('jaderberg-linear', 1, 2)
    assert len(units) == 3 and len(synth) == 4  # units 0..2, cuts before 0..3
    assert min([stem, head] + units + synth) > 0
    # The units of a block after its first are alike and timed once; ResBlock-2's
    # and ResBlock-3's have the same weights' shapes but not the same maps (11x11,
    # 6x6), and are timed apart.
    _, units, _, synth = balance.stage_costs('jaderberg-linear', 3, 2)
    assert units[1] == units[2] and units[4] == units[5] and units[7] == units[8]
    assert units[5] != units[8]
    # The synthesizer at a cut is timed once per shape of h there, written out from
    # the paper's network (stem 16 x 22 x 22, then 32 x 22 x 22, 64 x 11 x 11 and
    # 64 x 6 x 6 after each unit of ResBlock-1, 2, 3): equal times exactly where the
    # shapes are equal.
    shapes = [(16, 22)] + [(32, 22)] * 3 + [(64, 11)] * 3 + [(64, 6)] * 3
    assert len(synth) == len(shapes)
    for a in range(len(shapes)):
        for b in range(len(shapes)):
            assert (synth[a] == synth[b]) == (shapes[a] == shapes[b]), (a, b)
