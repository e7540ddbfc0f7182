"""Resampling weights and percentile intervals."""

import math

import numpy as np
import pytest

from analysis.bootstrap import Interval, count_weights, interval, percentile_interval, resample_indices


def test_iid_counts_are_multinomial_draws():
    counts = count_weights(7, 2000, np.random.default_rng(0))
    assert counts.shape == (2000, 7)
    assert (counts.sum(axis=1) == 7).all()
    # each point is drawn once per replicate on average, and some replicates leave points out
    np.testing.assert_allclose(counts.mean(axis=0), 1.0, atol=0.1)
    assert (counts == 0).any(axis=1).mean() > 0.9


def test_groups_are_drawn_together():
    groups = np.array(["a", "a", "b", "b", "b", "c"])
    counts = count_weights(6, 500, np.random.default_rng(1), groups=groups)
    assert (counts[:, 0] == counts[:, 1]).all()
    assert (counts[:, 2] == counts[:, 3]).all() and (counts[:, 3] == counts[:, 4]).all()
    # three groups drawn three times: group counts sum to 3 in every replicate
    assert (counts[:, 0] + counts[:, 2] + counts[:, 5] == 3).all()


def test_strata_keep_their_size():
    strata = np.array([1e18, 1e18, 1e18, 1e19, 1e19])
    counts = count_weights(5, 300, np.random.default_rng(2), strata=strata)
    assert (counts[:, :3].sum(axis=1) == 3).all()
    assert (counts[:, 3:].sum(axis=1) == 2).all()


def test_resample_indices_match_counts():
    counts = np.array([[2, 0, 1], [0, 3, 0]])
    idx = resample_indices(counts)
    assert sorted(idx[0].tolist()) == [0, 0, 2]
    assert idx[1].tolist() == [1, 1, 1]


def test_percentile_interval():
    samples = np.arange(1, 1001, dtype=float)
    low, high = percentile_interval(samples, 0.9)
    assert low == pytest.approx(np.percentile(samples, 5))
    assert high == pytest.approx(np.percentile(samples, 95))
    # NaNs (failed replicates) are ignored; too few finite draws give no interval
    with_nan = np.concatenate([samples, [np.nan] * 50])
    assert percentile_interval(with_nan, 0.9) == (low, high)
    assert all(math.isnan(v) for v in percentile_interval(np.array([1.0, np.nan]), 0.9))


def test_interval_object():
    iv = interval(2.0, np.linspace(1.0, 3.0, 101), 0.95)
    assert iv.has_interval and iv.covers(2.9) and not iv.covers(3.5)
    assert str(iv).startswith("2 [")
    bare = Interval(1.5)
    assert not bare.has_interval and not bare.covers(1.5) and str(bare) == "1.5"
