"""stats.py: paired differences, their bootstrap intervals, the exact McNemar test and the
detectable difference, against hand computations and closed forms."""
import math

import numpy as np
import pytest

import stats


def test_identical_models_differ_by_zero_and_the_table_says_no_question_differs_not_a_zero_width_interval():
    a = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    d = stats.paired_difference(a, a)
    assert d == {"diff": 0.0, "low": 0.0, "high": 0.0, "n": 8, "seeds": 1, "differing": 0}
    assert stats.format_difference(d) == "+0.000 (no question differs)"
    assert stats.mcnemar_exact(a, a) == 1.0


def test_the_difference_is_b_minus_a_and_the_interval_is_deterministic_and_contains_it():
    a = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 0] * 10)
    b = np.array([1, 0, 1, 1, 1, 1, 0, 0, 1, 0] * 10)        # b right on 20 more of 100 questions
    d = stats.paired_difference(a, b, seed=3)
    assert d["diff"] == pytest.approx(0.2) and d["low"] < 0.2 < d["high"]
    assert d == stats.paired_difference(a, b, seed=3)
    assert stats.paired_difference(b, a, seed=3)["diff"] == pytest.approx(-0.2)


def test_the_bootstrap_interval_matches_the_normal_approximation_on_a_large_sample():
    rng = np.random.default_rng(0)
    n = 4000
    a = (rng.random(n) < 0.5).astype(float)
    b = np.where(rng.random(n) < 0.3, 1 - a, a)              # 30% of the questions flip
    diffs = b - a
    se = diffs.std(ddof=0) / math.sqrt(n)
    d = stats.paired_difference(a, b, resamples=20_000)
    assert d["high"] - d["low"] == pytest.approx(2 * 1.959964 * se, rel=0.05)
    assert (d["low"] + d["high"]) / 2 == pytest.approx(diffs.mean(), abs=0.2 * se)


def test_seeds_are_pooled_by_averaging_each_questions_difference_over_them():
    a = np.array([[0, 1, 0, 1], [0, 0, 0, 1], [1, 1, 0, 1]])
    b = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 0, 0]])
    d = stats.paired_difference(a, b)
    assert d["seeds"] == 3 and d["n"] == 4
    assert d["diff"] == pytest.approx((b - a).mean())
    # a question's seed-mean difference is what gets resampled: with every question alike, no spread —
    # the question-level interval is conditional on the runs, blind to a whole seed moving …
    same = stats.paired_difference(np.zeros((3, 5)), np.tile([[1.0], [0.0], [0.0]], (1, 5)))
    assert same["low"] == same["high"] == pytest.approx(1 / 3)
    # … which the seed-level interval sees: seed means 1, 0, 0 → 1/3 ± t_2 · sd / √3, sd = √(1/3)
    seeds = stats.seed_interval(np.zeros((3, 5)), np.tile([[1.0], [0.0], [0.0]], (1, 5)))
    half = 4.302653 * math.sqrt(1 / 3) / math.sqrt(3)
    assert seeds["diff"] == pytest.approx(1 / 3) and seeds["per_seed"] == [1.0, 0.0, 0.0]
    assert (seeds["low"], seeds["high"]) == pytest.approx((1 / 3 - half, 1 / 3 + half), abs=1e-6)


def test_t_quantile_matches_the_tables_and_the_seed_interval_is_none_for_one_seed():
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert stats.t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)
    assert stats.t_quantile(0.99, 2) == pytest.approx(9.9248, abs=1e-4)
    assert stats.seed_interval([0, 1, 1], [1, 1, 1]) is None
    assert stats.format_difference(None) == "–"
    # seeds that agree exactly: a zero-width seed interval around their common mean difference
    a, b = np.zeros((3, 4)), np.array([[1, 0, 0, 0]] * 3)
    assert stats.seed_interval(a, b) == {"diff": 0.25, "low": 0.25, "high": 0.25, "seeds": 3,
                                         "per_seed": [0.25, 0.25, 0.25]}
    assert stats.format_difference(stats.seed_interval(a, b)) == "+0.250 (every seed the same)"


def test_mcnemar_exact_is_the_two_sided_binomial_tail_of_the_disagreements():
    # 10 disagreements split 8 / 2: p = 2 * P(X <= 2), X ~ Bin(10, 1/2) = 2 * 56 / 1024
    a = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 5)
    b = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5)
    assert stats.discordant_counts(a, b) == (8, 2)
    assert stats.mcnemar_exact(a, b) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert stats.mcnemar_exact(b, a) == stats.mcnemar_exact(a, b)
    even = np.array([0, 1]), np.array([1, 0])
    assert stats.mcnemar_exact(*even) == 1.0                 # an even split is capped at 1


def test_detectable_difference_is_the_normal_approximation_formula():
    z = 1.959964 + 0.841621                                   # z_0.975 + z_0.8
    assert stats.detectable_difference(1000, 0.2) == pytest.approx(z * math.sqrt(0.2 / 1000), rel=1e-5)
    assert stats.detectable_difference(4000, 0.2) == pytest.approx(stats.detectable_difference(1000, 0.2) / 2)


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="same shape"):
        stats.paired_difference([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="binary"):
        stats.mcnemar_exact([0, 0.5], [1, 0])
    with pytest.raises(ValueError, match="N > 0"):
        stats.paired_difference([], [])
    with pytest.raises(ValueError, match="discordant"):
        stats.detectable_difference(10, 1.5)
    with pytest.raises(ValueError, match="resamples"):
        stats.paired_difference([0, 1], [1, 1], resamples=0)
    with pytest.raises(ValueError, match="same seeds and questions"):
        stats.seed_interval(np.zeros((3, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile(0.95, 0)


def test_format_difference_prints_sign_and_interval():
    assert stats.format_difference({"diff": 0.031, "low": -0.0124, "high": 0.05}) == "+0.031 [-0.012, +0.050]"


def test_detectable_from_pairs_is_the_discordant_formula_for_one_seed_and_shrinks_when_seeds_agree_less():
    a = np.array([1, 0] * 50 + [1] * 300 + [0] * 600)                         # 1,000 questions
    b = np.array([0, 1] * 50 + [1] * 300 + [0] * 600)                         # 10% discordant, difference 0
    assert stats.detectable_from_pairs(a, b) == pytest.approx(stats.detectable_difference(1000, 0.1), rel=1e-12)
    # by hand: (1.95996 + 0.84162) · sqrt(0.1 / 1000)
    assert stats.detectable_from_pairs(a, b) == pytest.approx(2.80159 * (0.1 / 1000) ** 0.5, rel=1e-5)
    # three seeds whose disagreements fall on different questions: each question's mean difference is
    # ±1/3 on 300 questions, so sd² = 300/1000 · 1/9 and the MDD is sqrt(3) times smaller than one seed's
    rows_a, rows_b = [], []
    for s in range(3):
        x, y = np.zeros(1000), np.zeros(1000)
        x[s * 100:s * 100 + 50], y[s * 100 + 50:s * 100 + 100] = 1, 1
        rows_a.append(x), rows_b.append(y)
    pooled = stats.detectable_from_pairs(np.array(rows_a), np.array(rows_b))
    assert pooled == pytest.approx(stats.detectable_difference(1000, 0.1) / 3 ** 0.5, rel=1e-12)
    # a real difference does not shrink it: 10% discordant all one way is still the 10% design
    one_way = np.where(np.arange(1000) < 100, 1.0, 0.0)
    assert stats.detectable_from_pairs(np.zeros(1000), one_way) == pytest.approx(
        stats.detectable_difference(1000, 0.1), rel=1e-12)
    assert stats.detectable_from_pairs(a, a) == 0.0                            # never differ
    with pytest.raises(ValueError, match="same shape"):
        stats.detectable_from_pairs(a, b[:10])
