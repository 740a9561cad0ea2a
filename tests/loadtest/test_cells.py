"""How the load tests' tables write a number."""

from __future__ import annotations

from loadtest.cells import fixed


def test_numbers_get_fixed_decimals_whatever_their_type() -> None:
    assert fixed(0.12345) == "0.123"
    assert fixed(2, 2) == "2.00"
    assert fixed(1234.5, 0) == "1234"


def test_missing_figures_are_a_dash_or_what_the_report_says() -> None:
    assert fixed(None) == "-"
    assert fixed(None, missing="n/a") == "n/a"


def test_grouping_and_values_that_are_not_numbers() -> None:
    assert fixed(12345.678, 1, grouped=True) == "12,345.7"
    assert fixed("x") == "x"
    assert fixed(True) == "True"
