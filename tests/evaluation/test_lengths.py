"""Length statistics (ilrdpo.evaluation.lengths), with the arithmetic worked by hand."""

import math

import pytest

from ilrdpo.evaluation import length_stats


def test_worked_target_errors():
    """Lengths [10, 20, 30] against their own targets [12, 20, 25]:

    err = [-2, 0, 5];  mae = (2 + 0 + 5) / 3 = 7/3;  rmse = sqrt((4 + 0 + 25) / 3) = sqrt(29/3);
    bias = 3/3 = 1.
    """
    out = length_stats([10, 20, 30], [50, 90, 130], target_lengths=[12, 20, 25])
    assert out["target_count"] == 3
    assert out["target_mae"] == pytest.approx(7 / 3)
    assert out["target_rmse"] == pytest.approx(math.sqrt(29 / 3))
    assert out["target_bias"] == pytest.approx(1.0)


def test_missing_targets_are_skipped():
    """Only entries 0 and 2 have targets: err = [10 - 12, 30 - 25] = [-2, 5]."""
    out = length_stats([10, 20, 30], [1, 2, 3], target_lengths=[12, None, 25])
    assert out["target_count"] == 2
    assert out["target_mae"] == pytest.approx(3.5)
    assert out["target_rmse"] == pytest.approx(math.sqrt(29 / 2))
    none = length_stats([10], [1], target_lengths=[None])
    assert none["target_count"] == 0 and none["target_mae"] is None


def test_char_targets():
    out = length_stats([10, 20], [40, 100], target_lengths=[50, 100], target_unit="chars")
    assert out["target_mae"] == pytest.approx(5.0)  # err = [-10, 0]


def test_centre_percentiles_and_truncation():
    """Tokens 1..10: mean 5.5, median 5.5; numpy linear percentiles p10 = 1.9, p90 = 9.1."""
    tokens = list(range(1, 11))
    out = length_stats(tokens, [4 * t for t in tokens], truncated=[False] * 7 + [True] * 3)
    assert out["n"] == 10
    assert out["tokens_mean"] == 5.5 and out["tokens_median"] == 5.5
    assert out["tokens_p10"] == pytest.approx(1.9)
    assert out["tokens_p50"] == pytest.approx(5.5)
    assert out["tokens_p90"] == pytest.approx(9.1)
    assert out["chars_mean"] == 22.0 and out["chars_median"] == 22.0
    assert out["truncated_share"] == pytest.approx(0.3)
    assert "target_mae" not in out


def test_empty_and_mismatched():
    out = length_stats([], [])
    assert out["n"] == 0 and out["tokens_mean"] is None and out["truncated_share"] is None
    with pytest.raises(ValueError):
        length_stats([1, 2], [1])
    with pytest.raises(ValueError):
        length_stats([1, 2], [1, 2], target_lengths=[1])
