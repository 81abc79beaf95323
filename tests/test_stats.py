"""The bootstrap intervals of ``consa_vllm.eval.stats`` against closed-form answers on synthetic scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from consa_vllm.eval.stats import bootstrap_ci, paired_bootstrap, paired_bootstrap_max, prompts_for_difference


def test_bernoulli_interval_matches_the_normal_approximation():
    # 1000 verdicts, 700 correct: the normal (Wald) interval is 0.7 +- 1.96 sqrt(0.21 / 1000) = +-0.0284.
    x = np.array([1] * 700 + [0] * 300)
    ci = bootstrap_ci(x, seed=3)
    half = 1.96 * math.sqrt(0.7 * 0.3 / 1000)
    assert ci.mean == pytest.approx(0.7)
    assert ci.low == pytest.approx(0.7 - half, abs=0.003)
    assert ci.high == pytest.approx(0.7 + half, abs=0.003)
    assert ci.se == pytest.approx(math.sqrt(0.21 / 1000), rel=0.03)


def test_paired_difference_significant_when_discordance_is_lopsided():
    # Same 1000 prompts: 60 that only a gets right, 20 that only b gets right. The difference is
    # 0.04 with se sqrt((0.08 - 0.04^2) / 1000) = 0.00885 (McNemar): 4.5 se, p about 7e-6.
    a = np.array([1] * 600 + [1] * 60 + [0] * 20 + [0] * 320)
    b = np.array([1] * 600 + [0] * 60 + [1] * 20 + [0] * 320)
    d = paired_bootstrap(a, b, seed=1)
    assert d.mean == pytest.approx(0.04)
    assert d.se == pytest.approx(math.sqrt((0.08 - 0.04 ** 2) / 1000), rel=0.03)
    assert d.significant and d.low > 0.02 and d.p_value < 0.001
    # Two independent intervals overlap (each +-0.03 around 0.66 and 0.62), yet the paired one does not.
    ia, ib = bootstrap_ci(a, seed=1), bootstrap_ci(b, seed=1)
    assert ia.low < ib.high


def test_paired_difference_not_significant_when_discordance_is_balanced():
    a = np.array([1] * 600 + [1] * 40 + [0] * 40 + [0] * 320)
    b = np.array([1] * 600 + [0] * 40 + [1] * 40 + [0] * 320)
    d = paired_bootstrap(a, b, seed=1)
    assert d.mean == 0.0 and not d.significant and d.p_value > 0.5
    assert d.low == pytest.approx(-1.96 * math.sqrt(0.08 / 1000), abs=0.002)


def test_paired_max_difference_is_one_prompts_chance_of_being_drawn():
    # b's worst token is 0.1 on each of 100 prompts; a's too, but 0.5 on one prompt. A resample
    # holds that prompt with probability 1 - (1 - 1/n)^n = 0.634: then max(a) - max(b) = 0.4,
    # else 0. So the interval reaches 0 and the p-value is 2 (1 - 1/n)^n = 0.732: one extreme
    # prompt is no evidence that a's errors run larger.
    n = 100
    b = np.full(n, 0.1)
    a = b.copy()
    a[17] = 0.5
    d = paired_bootstrap_max(a, b, seed=2)
    assert d.mean == pytest.approx(0.4) and d.high == pytest.approx(0.4) and d.low == 0.0
    assert d.p_value == pytest.approx(2 * (1 - 1 / n) ** n, abs=0.02) and not d.significant
    # a's worst token larger on every prompt: every resample says so.
    d = paired_bootstrap_max(b + 0.01, b, seed=2)
    assert d.low == pytest.approx(0.01) and d.significant and d.p_value == pytest.approx(1e-4)
    # The same draws under either label: a symmetric interval around 0.
    rng = np.random.default_rng(4)
    x, y = rng.exponential(size=300), rng.exponential(size=300)
    assert paired_bootstrap_max(x, y, seed=1).low == pytest.approx(-paired_bootstrap_max(y, x, seed=1).high)
    assert paired_bootstrap_max(x, y, seed=1) == paired_bootstrap_max(x, y, seed=1)
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap_max([1.0, 0.5], [1.0])


def test_deterministic_by_seed():
    x = np.random.default_rng(0).random(200) < 0.8
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)


def test_prompts_for_a_two_point_difference_at_three_standard_errors():
    assert prompts_for_difference(0.02, 0.5) == 11250  # 2 * 0.25 * 150^2
    assert prompts_for_difference(0.02, 0.9) == 4050
    n = prompts_for_difference(0.02, 0.8)
    assert 0.02 / math.sqrt(2 * 0.8 * 0.2 / n) >= 3 > 0.02 / math.sqrt(2 * 0.8 * 0.2 / (n - 1))


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1, 0], level=95)
