"""Settings are range-checked where they are read: a ``ConfigError`` names the setting, the
variable, the value given and what is allowed, whether it came as an argument or from the
environment."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

import asyncflow as af

ENV_SETTINGS = [
    ("lane_capacity", "ASYNCFLOW_LANE_CAPACITY", ["0", "-1", "nan", "abc", "2.5", "inf"]),
    ("fetch_max", "ASYNCFLOW_FETCH_MAX", ["0", "-3", "x", "1e3"]),
    ("commit_interval", "ASYNCFLOW_COMMIT_INTERVAL", ["0", "-1", "nan", "inf", "1e-9", "soon"]),
    ("idle_timeout", "ASYNCFLOW_IDLE_TIMEOUT", ["-1", "nan", "inf", "never"]),
    ("max_time_ahead", "ASYNCFLOW_MAX_TIME_AHEAD", ["0", "-5", "nan", "inf", "tomorrow"]),
]


@pytest.mark.parametrize(
    ("setting", "variable", "value"),
    [(s, v, x) for s, v, values in ENV_SETTINGS for x in values],
)
def test_a_bad_environment_variable_names_the_setting_the_variable_and_what_is_allowed(
    monkeypatch: pytest.MonkeyPatch, setting: str, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(af.ConfigError) as info:
        af.App("a")
    message = str(info.value)
    assert f"{variable}={value!r}" in message
    assert f"valid {setting};" in message
    assert "allowed: " in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("lane_capacity", 0),
        ("lane_capacity", -1),
        ("lane_capacity", 2.5),
        ("lane_capacity", True),
        ("fetch_max", 0),
        ("commit_interval", 0),
        ("commit_interval", -1.0),
        ("commit_interval", float("nan")),
        ("idle_timeout", -0.5),
        ("idle_timeout", float("inf")),
        ("drain_timeout", -1.0),
        ("shutdown_timeout", 0),
        ("shutdown_timeout", float("nan")),
        ("watermark_interval", 0),
        ("watermark_interval", 1e-9),
        ("max_time_ahead", timedelta(0)),
        ("max_time_ahead", "a day"),
    ],
)
def test_a_bad_argument_names_the_setting_the_value_and_what_is_allowed(
    setting: str, value: Any
) -> None:
    with pytest.raises(af.ConfigError) as info:
        af.App("a", **{setting: value})
    message = str(info.value)
    assert message.startswith(f"{setting}={value!r} is not a valid {setting}; allowed: ")
    assert f"App({setting}=...)" in message


def test_the_environment_variable_is_named_even_when_the_argument_was_wrong() -> None:
    with pytest.raises(af.ConfigError, match=r"or ASYNCFLOW_FETCH_MAX\)"):
        af.App("a", fetch_max=0)


def test_an_argument_of_zero_is_refused_not_replaced_by_the_default() -> None:
    with pytest.raises(af.ConfigError, match="lane_capacity=0"):
        af.App("a", lane_capacity=0)


def test_values_in_range_are_taken_from_arguments_then_variables_then_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASYNCFLOW_LANE_CAPACITY", " 64 ")
    monkeypatch.setenv("ASYNCFLOW_IDLE_TIMEOUT", "0")
    monkeypatch.setenv("ASYNCFLOW_MAX_TIME_AHEAD", "none")
    app = af.App("a", fetch_max=1, commit_interval=0.5, drain_timeout=0)
    assert (app.lane_capacity, app.fetch_max, app.commit_interval) == (64, 1, 0.5)
    assert (app.idle_timeout, app.drain_timeout, app.max_time_ahead_ms) == (0.0, 0.0, None)
    assert (app.shutdown_timeout, app.watermark_interval) == (30.0, 0.2)


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf"), timedelta(0)])
def test_a_timer_interval_that_would_spin_or_never_fire_is_refused(interval: Any) -> None:
    app = af.App("a")
    with pytest.raises(af.ConfigError, match=r"app\.timer\(.*\): the interval must be"):
        app.timer(interval)
