"""Intervals over seeds and paired differences, checked against values worked out by hand
(t quantiles from a table: t_{0.975,1} = 12.7062, t_{0.975,2} = 4.3027, t_{0.975,4} = 2.7764)."""

from __future__ import annotations

import math

import pytest

from pipelines.stats import fmt, fmt_difference, interval, paired, paired_ratio, t_quantile


@pytest.mark.parametrize(("dof", "t"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)])
def test_t_quantiles_match_the_table(dof, t):
    assert t_quantile(0.95, dof) == pytest.approx(t, abs=5e-5)


def test_interval_of_three_values_by_hand():
    iv = interval([1.0, 2.0, 3.0])  # mean 2, sample sd 1
    assert iv.n == 3 and iv.mean == pytest.approx(2.0)
    assert iv.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (iv.low, iv.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), rel=1e-6)


def test_interval_of_two_values_by_hand():
    iv = interval([0.5, 0.7])  # sd = 0.2 / sqrt(2)
    assert iv.half == pytest.approx(12.706205 * (0.2 / math.sqrt(2)) / math.sqrt(2), rel=1e-6)
    assert fmt(iv) == "60.00 ± 127.06"


def test_one_value_has_no_interval():
    iv = interval([0.42])
    assert iv.n == 1 and iv.half is None and iv.low is None and iv.significant is None
    assert fmt(iv) == "42.00 (n=1)"
    assert fmt_difference(paired({3: 0.5}, {3: 0.4})) == "+10.00 (interval unavailable: one seed)"
    with pytest.raises(ValueError):
        interval([])


def test_paired_differences_use_the_common_seeds_only():
    method = {0: 0.6, 1: 0.7, 2: 0.8}
    base = {0: 0.5, 1: 0.5, 2: 0.7, 3: 0.9}  # seed 3 has no partner and is left out
    d = paired(method, base)  # differences 0.1, 0.2, 0.1: mean 0.1333, sd 0.057735
    assert d.n == 3 and d.mean == pytest.approx(0.4 / 3)
    assert d.half == pytest.approx(4.302653 * 0.0577350 / math.sqrt(3), rel=1e-5)
    assert d.low == pytest.approx(0.4 / 3 - 0.143422, abs=1e-5)
    assert d.significant is False  # the interval reaches just below 0
    assert paired({0: 0.1}, {1: 0.2}) is None


def test_significance_follows_whether_the_interval_contains_zero():
    assert paired({0: 0.6, 1: 0.7, 2: 0.65}, {0: 0.5, 1: 0.6, 2: 0.55}).significant is True
    assert paired({0: 0.4, 1: 0.5, 2: 0.45}, {0: 0.5, 1: 0.6, 2: 0.55}).significant is True
    mixed = paired({0: 0.6, 1: 0.4, 2: 0.5}, {0: 0.5, 1: 0.5, 2: 0.5})
    assert mixed.significant is False
    assert fmt_difference(mixed).endswith("(n.s.)")


def test_paired_ratio_of_epoch_times():
    r = paired_ratio({0: 3.0, 1: 3.3}, {0: 5.0, 1: 5.5})  # both 0.6: a zero-width interval
    assert r.mean == pytest.approx(0.6) and r.half == pytest.approx(0.0, abs=1e-12)
