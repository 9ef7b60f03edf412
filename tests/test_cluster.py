"""kmeans_1d: the deterministic 1-D k-means that groups adder channels by weight range."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.cluster import kmeans_1d
from qcompiler.errors import SpecError

PROPERTY = settings(max_examples=60, deadline=None)


def _means(values: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    return {int(g): float(values[labels == g].mean()) for g in np.unique(labels)}


def test_docstring_example():
    assert kmeans_1d(np.array([0.1, 5.0, 0.2, 5.1, 9.0]), 3).tolist() == [0, 1, 0, 1, 2]


def test_same_input_and_seed_give_the_same_groups_every_time():
    values = np.random.default_rng(123).gamma(2.0, 1.0, size=64)
    first = kmeans_1d(values, 4, seed=7)
    np.random.seed(999)  # the global numpy state must not matter
    second = kmeans_1d(values.copy(), 4, seed=7)
    assert np.array_equal(first, second)
    assert first.dtype.kind == "i" and first.shape == (64,)
    # a list of the same values gives the same groups
    assert np.array_equal(kmeans_1d(values.tolist(), 4, seed=7), first)


def test_group_ids_are_ordered_by_centre():
    values = np.random.default_rng(5).normal(size=40) ** 2
    labels = kmeans_1d(values, 4)
    means = _means(values, labels)
    ids = sorted(means)
    assert ids == list(range(len(ids)))
    assert all(means[a] < means[b] for a, b in zip(ids, ids[1:]))
    # In one dimension each group is an interval, in id order: sorting the values
    # sorts their group ids too.
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(labels[order]) >= 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 11])
def test_obvious_clusters_are_recovered_whatever_the_seed(seed):
    rng = np.random.default_rng(42)
    centres = [0.1, 2.0, 7.0, 30.0]
    truth = np.repeat(np.arange(4), 6)
    values = np.array([centres[g] for g in truth]) + rng.uniform(-0.02, 0.02, size=truth.size)
    perm = rng.permutation(truth.size)
    labels = kmeans_1d(values[perm], 4, seed=seed)
    assert labels.tolist() == truth[perm].tolist()


def test_one_group():
    assert kmeans_1d(np.array([3.0, -1.0, 2.0]), 1).tolist() == [0, 0, 0]


def test_k_equal_to_n_puts_each_value_in_its_own_group_in_value_order():
    values = np.array([3.0, 0.5, 2.0, 9.0, 1.0])
    assert kmeans_1d(values, 5).tolist() == [3, 0, 2, 4, 1]


def test_k_equal_to_n_with_repeated_values_still_returns_valid_ids():
    labels = kmeans_1d(np.array([1.0, 1.0, 2.0]), 3)
    assert labels.shape == (3,) and labels.min() >= 0 and labels.max() < 3
    assert labels[0] == labels[1] < labels[2]


def test_more_groups_than_values_is_a_one_line_spec_error_naming_the_fix():
    with pytest.raises(SpecError) as info:
        kmeans_1d(np.array([0.1, 0.2, 0.3]), 4)
    msg = str(info.value)
    assert "\n" not in msg
    assert "4 groups" in msg and "3 channels" in msg
    assert "lower adder_groups to at most 3" in msg


def test_zero_groups_is_a_spec_error():
    with pytest.raises(SpecError, match="at least 1"):
        kmeans_1d(np.array([0.1, 0.2]), 0)


@st.composite
def _separated(draw):
    """Values drawn around k well-separated centres (gaps >= 100x the spread)."""
    k = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 8), min_size=k, max_size=k))
    gaps = draw(st.lists(st.floats(100.0, 1000.0), min_size=k, max_size=k))
    centres = np.cumsum(gaps) - draw(st.floats(0.0, 50.0))
    spread = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    values = np.concatenate([c + rng.uniform(-spread, spread, size=n) for c, n in zip(centres, sizes)])
    return rng.permutation(values), k, seed


@PROPERTY
@given(_separated())
def test_labels_in_range_and_a_lloyd_fixed_point(case):
    values, k, seed = case
    labels = kmeans_1d(values, k, seed=seed)
    assert labels.shape == values.shape
    assert labels.min() >= 0 and labels.max() < k
    means = _means(values, labels)
    for v, g in zip(values, labels):
        own = abs(v - means[int(g)])
        for other, m in means.items():
            if other != g:
                assert own <= abs(v - m) + 1e-9, (v, g, other, means)
    # ids follow the centres
    ids = sorted(means)
    assert all(means[a] < means[b] for a, b in zip(ids, ids[1:]))


@PROPERTY
@given(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=40), st.integers(1, 6), st.integers(0, 100))
def test_any_values_give_ids_in_range_and_the_same_answer_twice(values, k, seed):
    values = np.array(values)
    if k > len(values):
        with pytest.raises(SpecError):
            kmeans_1d(values, k, seed=seed)
        return
    labels = kmeans_1d(values, k, seed=seed)
    assert labels.min() >= 0 and labels.max() < k
    assert np.array_equal(labels, kmeans_1d(values, k, seed=seed))
    # groups are intervals in id order, equal values share a group
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(labels[order]) >= 0)
