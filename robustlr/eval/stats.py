"""Statistics for accuracies: Wilson 95% intervals, McNemar's exact paired test, and a
bootstrap over training seeds and test images (``seed_image_bootstrap``,
``paired_difference_bootstrap``) for studies with several training seeds.

The bootstrap: every seed of a network is evaluated on the same test images (and, for
targeted attacks, toward the same targets), so seeds and images are *crossed*, not nested.
One bootstrap replicate draws the seeds with replacement (K of K, per network) and, once,
the images with replacement (N of N); the same image draw serves every seed and, for a
difference, both networks (the pairing). The statistic is the mean over the drawn seeds of
the accuracy on the drawn images. Drawing images anew for each seed would treat each seed's
images as a fresh sample and shrink the image part of the variance by about K.
``scipy.stats.bootstrap`` resamples one level of i.i.d. observations and cannot express the
two crossed levels, hence the resampling here (numpy; percentile interval). With a single
seed the seed level is trivial and the interval is the image-level bootstrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default), as fractions in [0, 1]."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class McNemarResult:
    only_a: int  # examples model A gets right and model B wrong
    only_b: int  # examples model B gets right and model A wrong
    p_value: float  # exact two-sided binomial test on the discordant pairs

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemarResult:
    """McNemar's exact test: do two models, on the same images and targets, differ in accuracy?

    Shape: correct_a (N,) bool, correct_b (N,) bool.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes must have one shape, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return McNemarResult(only_a, only_b, 1.0)
    from scipy.stats import binomtest  # here: a study's stage processes need no scipy (1 s)

    return McNemarResult(only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue))


BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # fixed: a report is a pure function of its inputs
CONFIDENCE = 0.95


@dataclass(frozen=True)
class BootstrapResult:
    """A statistic in percent (accuracy, or a difference of accuracies), its percentile
    interval, and for a difference the two-sided bootstrap p-value of "no difference"."""

    estimate: float
    low: float
    high: float
    p_value: float | None
    seeds: tuple[int, ...]  # the number of seeds per network (1 or 2 networks)
    n: int  # test images
    resamples: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _outcome_matrix(outcomes: np.ndarray) -> np.ndarray:
    matrix = np.asarray(outcomes, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"outcomes must be a non-empty (seeds, images) array, got {matrix.shape}")
    return matrix


def _draws(rng: np.random.Generator, count: int, resamples: int) -> np.ndarray:
    """How often each of ``count`` items is drawn in each replicate (draws with replacement).

    Shape: -> (resamples, count), each row summing to ``count``.
    """
    return rng.multinomial(count, np.full(count, 1.0 / count), size=resamples).astype(float)


def _replicates(
    matrices: list[np.ndarray], resamples: int, rng_seed: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per network, the bootstrap replicates of its mean accuracy (one shared image draw).

    Shape: matrices [(K_j, N)] -> [(resamples,)] per network, image draws (resamples, N).
    """
    n = matrices[0].shape[1]
    if any(m.shape[1] != n for m in matrices):
        raise ValueError("paired outcomes must cover the same images")
    rng = np.random.default_rng(rng_seed)
    images = _draws(rng, n, resamples)
    out = []
    for matrix in matrices:
        seeds = _draws(rng, matrix.shape[0], resamples)
        out.append(((seeds @ matrix) * images).sum(1) / (matrix.shape[0] * n))
    return out, images


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def seed_image_bootstrap(
    outcomes: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    rng_seed: int = BOOTSTRAP_SEED,
) -> BootstrapResult:
    """Mean accuracy (%) over seeds and its two-level percentile interval (module docstring).

    Shape: outcomes (K seeds, N images) bool, every seed on the same images.
    """
    matrix = _outcome_matrix(outcomes)
    (values,), _ = _replicates([matrix], resamples, rng_seed)
    low, high = _interval(100 * values, confidence)
    return BootstrapResult(
        100 * float(matrix.mean()), low, high, None, (matrix.shape[0],), matrix.shape[1], resamples
    )


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from bootstrap replicates of a difference: twice
    the smaller share of replicates on either side of 0 (each share counted with the +1 of
    Davison & Hinkley so that it is never 0), capped at 1. It is below 1 - confidence exactly
    when the percentile interval of that confidence excludes 0 (up to the +1)."""
    b = len(differences)
    below = (int((differences <= 0).sum()) + 1) / (b + 1)
    above = (int((differences >= 0).sum()) + 1) / (b + 1)
    return float(min(1.0, 2 * min(below, above)))


def paired_difference_bootstrap(
    outcomes_a: np.ndarray,
    outcomes_b: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    rng_seed: int = BOOTSTRAP_SEED,
) -> BootstrapResult:
    """Mean accuracy of A minus B (percentage points), its two-level percentile interval and
    p-value: A's and B's seeds drawn independently, the images drawn once for both (paired).

    Shape: outcomes_a (K_a, N) bool, outcomes_b (K_b, N) bool, on the same N images.
    """
    a, b = _outcome_matrix(outcomes_a), _outcome_matrix(outcomes_b)
    (values_a, values_b), _ = _replicates([a, b], resamples, rng_seed)
    differences = 100 * (values_a - values_b)
    low, high = _interval(differences, confidence)
    return BootstrapResult(
        100 * (float(a.mean()) - float(b.mean())),
        low,
        high,
        bootstrap_p_value(differences),
        (a.shape[0], b.shape[0]),
        a.shape[1],
        resamples,
    )
