"""bench/retro_rules.py's summary over seeds."""

from __future__ import annotations

import pytest

from conftest import load_bench


def test_bpb_change_over_seeds_is_the_mean_with_a_student_t_interval():
    rules = load_bench("retro_rules")
    # two seeds: mean 0.2, standard error 0.1, t(0.975, 1 df) = 12.706
    assert rules._over_seeds([0.1, 0.3]) == "+0.2000 [-1.0706, +1.4706]"
    # four seeds whose spread is small: the interval is narrow and excludes zero
    text = rules._over_seeds([-0.0170, -0.0140, -0.0064, -0.0063])
    mean, interval = text.split(" ", 1)
    low, high = (float(x) for x in interval.strip("[]").split(", "))
    assert float(mean) == pytest.approx(-0.0109, abs=1e-4) and low < float(mean) < high < 0
    assert rules._over_seeds([0.0005]) == "+0.0005"  # one seed: no interval to give
