"""docs/review.py's power of a paired t test, against a simulation of that test; and its seed count."""

import sys

import numpy as np
from conftest import ROOT
from scipy.stats import ttest_1samp

sys.path.insert(0, str(ROOT / "docs"))  # review.py imports convergence.py beside it
import review  # noqa: E402


def test_power_against_simulated_paired_t_tests():
    rng = np.random.default_rng(0)
    for effect, sd, n in ((0.05, 0.04, 5), (0.013, 0.078, 5), (0.3, 1.0, 20)):
        d = rng.normal(effect, sd, (20000, n))  # 20,000 studies of n paired differences
        simulated = np.mean(ttest_1samp(d, 0, axis=1).pvalue < 0.05)
        assert abs(review.power(effect, sd, n) - simulated) < 0.012, (effect, sd, n)
    assert abs(review.power(0.0, 1.0, 5) - 0.05) < 1e-12  # no effect: the test's size


def test_seeds_needed_is_the_first_n_with_80_percent_power():
    n = review.seeds_needed(0.062, 0.095)
    assert review.power(0.062, 0.095, n) >= 0.8 > review.power(0.062, 0.095, n - 1)
    assert review.seeds_needed(1e-6, 1.0) is None  # past the cap
