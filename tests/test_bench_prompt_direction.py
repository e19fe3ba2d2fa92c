"""bench.prompt_direction's statistics (the measurement itself runs minutes: ``python -m bench.prompt_direction``)."""

import math

from bench.prompt_direction import _auc, _stats


def test_auc_counts_pairs_and_ties():
    assert _auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert _auc([0.1], [0.9]) == 0.0
    assert _auc([0.5, 0.9], [0.5, 0.1]) == (1 * 0.5 + 1 + 1 + 1) / 4  # one tie counts half
    assert math.isnan(_auc([], [0.1]))


def test_stats_round_and_count():
    assert _stats([0.1234, 1.0, -2.0]) == {"min": -2.0, "median": 0.123, "max": 1.0, "n": 3}
