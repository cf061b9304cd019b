"""The study statistics (robustlr.eval.stats): the two-level bootstrap over training seeds and
test images and the paired difference, each checked against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from robustlr.eval.stats import (
    mcnemar,
    paired_difference_bootstrap,
    seed_image_bootstrap,
)


def _outcomes(accuracies: list[float], n: int, seed: int = 0) -> np.ndarray:
    """(seeds, images) bool outcomes, seed i right on a random share ``accuracies[i]``."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.random(n) < a for a in accuracies])


def _analytic_sd(matrix: np.ndarray) -> float:
    """Exact standard deviation (%) of the crossed bootstrap statistic (1/KN) v'Ow, with v and
    w independent multinomial draw counts of seeds and images: E[vv'] = I - J/K + J."""
    k, n = matrix.shape
    mv = np.eye(k) - np.ones((k, k)) / k + np.ones((k, k))
    mw = np.eye(n) - np.ones((n, n)) / n + np.ones((n, n))
    second = np.trace(matrix @ mw @ matrix.T @ mv)
    return 100 * math.sqrt(second - matrix.sum() ** 2) / (k * n)


def test_identical_seeds_give_the_image_level_interval():
    one = _outcomes([0.6], 359)[0]
    ours = seed_image_bootstrap(np.stack([one, one, one]), resamples=10000)
    ref = stats.bootstrap(
        (one.astype(float),), np.mean, method="percentile", n_resamples=10000, random_state=1
    ).confidence_interval
    assert ours.estimate == pytest.approx(100 * one.mean())
    assert ours.low == pytest.approx(100 * ref.low, abs=0.6)
    assert ours.high == pytest.approx(100 * ref.high, abs=0.6)
    assert ours.seeds == (3,) and ours.n == 359


def test_interval_width_matches_the_analytic_seed_and_image_variance():
    # seeds that disagree strongly: the seed level dominates the variance
    matrix = _outcomes([0.3, 0.5, 0.7, 0.9], 300, seed=2)
    result = seed_image_bootstrap(matrix, resamples=10000)
    sd = _analytic_sd(matrix.astype(float))
    assert (result.high - result.low) / (2 * 1.96) == pytest.approx(sd, rel=0.1)
    image_only = _analytic_sd(matrix.astype(float).mean(0, keepdims=True))
    assert result.high - result.low > 2 * 2 * 1.96 * image_only  # the seeds count


def test_known_difference_has_its_sign_interval_and_p_value():
    difficulty = np.random.default_rng(3).random(359)
    b = np.stack([difficulty < t for t in (0.5, 0.51, 0.52)])  # seeds that nearly agree
    a = b.copy()
    a[:, :40] = True  # A also gets the first 40 images right: A is higher
    result = paired_difference_bootstrap(a, b, resamples=4000)
    expected = 100 * (a.mean() - b.mean())
    assert expected > 0 and result.estimate == pytest.approx(expected)
    assert 0 < result.low < result.estimate < result.high
    assert result.p_value < 0.01 and result.excludes_zero()
    reverse = paired_difference_bootstrap(b, a, resamples=4000)
    assert reverse.estimate == pytest.approx(-expected) and reverse.high < 0


def test_no_difference_gives_p_one_and_a_zero_interval():
    one = _outcomes([0.5], 200, seed=4)
    result = paired_difference_bootstrap(one, one.copy())  # the same model twice
    assert (result.estimate, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    two = _outcomes([0.5, 0.7], 200, seed=4)  # the same two seeds: only the seed draws differ
    result = paired_difference_bootstrap(two, two.copy())
    assert result.estimate == 0.0 and result.low < 0 < result.high and result.p_value > 0.5


def test_difference_interval_holds_both_networks_seed_variance():
    rng = np.random.default_rng(5)
    shared = rng.random(359)  # image difficulty, the same for both networks
    a = np.stack([shared < t for t in (0.4, 0.8)])  # two very different seeds
    b = np.stack([shared < t for t in (0.6, 0.6)])
    result = paired_difference_bootstrap(a, b, resamples=8000)
    assert result.low < 0 < result.high and result.p_value > 0.2  # the seeds cannot tell
    assert result.high - result.low > 20


def test_p_value_agrees_with_the_interval():
    for seed in range(6):
        b = _outcomes([0.5, 0.6, 0.55], 150, seed=seed)
        a = _outcomes([0.5 + 0.03 * seed] * 3, 150, seed=seed + 10)
        result = paired_difference_bootstrap(a, b, resamples=2000)
        assert (result.p_value < 0.05) == result.excludes_zero() or abs(
            result.p_value - 0.05
        ) < 0.01


def test_mcnemar_is_the_exact_binomial_test():
    a = np.array([True] * 5 + [False] * 15)
    b = np.array([True] * 15 + [False] * 5)
    result = mcnemar(a, b)
    assert (result.only_a, result.only_b) == (0, 10)
    assert result.p_value == pytest.approx(2 / 2**10)
    c = np.array([True, False] * 10)
    d = np.array([True] * 7 + [False] * 3 + [False, True] * 5)
    got = mcnemar(c, d)
    k, m = min(got.only_a, got.only_b), got.only_a + got.only_b
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m  # the exact binomial tail
    assert (got.only_a, got.only_b) == (6, 8)
    assert got.p_value == pytest.approx(min(1.0, 2 * tail))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        seed_image_bootstrap(np.zeros((0, 3), dtype=bool))
    with pytest.raises(ValueError):
        paired_difference_bootstrap(np.zeros((2, 3), dtype=bool), np.zeros((2, 4), dtype=bool))
