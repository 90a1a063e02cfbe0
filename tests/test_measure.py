"""Tests for optimizer.measurement.sweep (the sweep's stopping rule and score) and loadgen.summarise_level."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from optimizer.errors import InferenceError, UsageError
from optimizer.measurement.builtin import summarise_level
from optimizer.measurement.levels import LevelResult
from optimizer.measurement.sweep import best_feasible, next_step, parse_levels, parse_rates

BUDGET_MS = 10.0


def _level(concurrency: int, throughput: float, p99_ms: float) -> LevelResult:
    return LevelResult(
        concurrency=concurrency,
        throughput=throughput,
        p50_ms=p99_ms / 2,
        p95_ms=p99_ms * 0.9,
        p99_ms=p99_ms,
        requests=100,
        duration_s=3.0,
    )


# --- best_feasible ------------------------------------------------------------------------------


def test_best_feasible_picks_the_highest_throughput_within_the_budget() -> None:
    levels = [_level(1, 100, 2), _level(2, 180, 4), _level(4, 250, 9), _level(8, 300, 15)]

    assert best_feasible(levels, BUDGET_MS) == levels[2]


def test_best_feasible_ignores_a_faster_level_over_the_budget() -> None:
    levels = [_level(1, 100, 2), _level(2, 500, 11)]

    assert best_feasible(levels, BUDGET_MS) == levels[0]


def test_best_feasible_counts_p99_exactly_at_the_budget_as_feasible() -> None:
    levels = [_level(1, 100, BUDGET_MS)]

    assert best_feasible(levels, BUDGET_MS) == levels[0]


def test_best_feasible_is_none_when_every_level_breaks_the_budget() -> None:
    assert best_feasible([_level(1, 100, 12), _level(2, 150, 20)], BUDGET_MS) is None


def test_best_feasible_of_no_levels_is_none() -> None:
    assert best_feasible([], BUDGET_MS) is None


# --- next_step ----------------------------------------------------------------------------------


def test_next_step_stops_when_p99_breaks_the_budget() -> None:
    levels = [_level(1, 100, 5), _level(2, 190, 12.34)]

    assert next_step(levels, BUDGET_MS, remaining=3) == "p99 12.3 ms broke the 10 ms budget at concurrency 2"


def test_next_step_stops_when_the_first_level_already_breaks_the_budget() -> None:
    assert next_step([_level(1, 100, 11)], BUDGET_MS, remaining=5) == (
        "p99 11.0 ms broke the 10 ms budget at concurrency 1"
    )


def test_next_step_stops_at_a_plateau_of_two_levels_under_3_percent_gain() -> None:
    levels = [_level(1, 100, 2), _level(2, 180, 3), _level(4, 185, 4)]  # +2.8 %
    assert next_step(levels, BUDGET_MS, remaining=3) is None  # one level without gain may be noise

    levels.append(_level(8, 184, 5))
    assert next_step(levels, BUDGET_MS, remaining=2) == "throughput stopped growing at concurrency 8"


def test_next_step_stops_when_throughput_falls_twice() -> None:
    levels = [_level(1, 100, 2), _level(2, 90, 3), _level(4, 95, 3)]

    assert next_step(levels, BUDGET_MS, remaining=3) == "throughput stopped growing at concurrency 4"


def test_a_single_dip_does_not_end_the_sweep_when_the_next_level_grows() -> None:
    # Recorded on the example encoder: 122 -> 100 at c=2 ended a sweep that the next repeat took to 280.
    levels = [_level(1, 122, 20), _level(2, 100, 25)]
    assert next_step(levels, BUDGET_MS * 10, remaining=4) is None
    levels.append(_level(4, 171, 28))
    assert next_step(levels, BUDGET_MS * 10, remaining=3) is None


def test_next_step_continues_when_throughput_grows_by_more_than_3_percent() -> None:
    levels = [_level(1, 100, 2), _level(2, 180, 3), _level(4, 186, 4)]  # +3.3 %

    assert next_step(levels, BUDGET_MS, remaining=3) is None


def test_next_step_continues_after_a_first_level_within_budget() -> None:
    assert next_step([_level(1, 100, 2)], BUDGET_MS, remaining=6) is None


def test_next_step_stops_at_the_last_level() -> None:
    levels = [_level(1, 100, 2), _level(2, 180, 3)]

    assert next_step(levels, BUDGET_MS, remaining=0) == "highest concurrency level reached"


def test_next_step_reports_a_budget_break_at_the_last_level_as_the_reason() -> None:
    levels = [_level(1, 100, 2), _level(2, 180, 30)]

    assert next_step(levels, BUDGET_MS, remaining=0) == "p99 30.0 ms broke the 10 ms budget at concurrency 2"


# --- parse_levels -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,2,4,8", (1, 2, 4, 8)),
        ("4", (4,)),
        (" 1, 2 ,16", (1, 2, 16)),
        ("1,3,5,100", (1, 3, 5, 100)),
    ],
)
def test_parse_levels_reads_ascending_comma_separated_levels(text: str, expected: tuple[int, ...]) -> None:
    assert parse_levels(text) == expected


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        pytest.param("", "ascending", id="empty"),
        pytest.param("a,b", "whole numbers", id="words"),
        pytest.param("1,2.5", "whole numbers", id="fraction"),
        pytest.param("0,1,2", "ascending", id="zero"),
        pytest.param("-1,2", "ascending", id="negative"),
        pytest.param("4,2,1", "ascending", id="descending"),
        pytest.param("1,2,2,4", "distinct", id="repeated"),
    ],
)
def test_parse_levels_rejects_bad_levels_quoting_the_text(text: str, phrase: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_levels(text)

    assert phrase in caught.value.message
    assert f"--concurrency {text!r}" in caught.value.message


# --- summarise_level ----------------------------------------------------------------------------


def test_summarise_level_reports_percentiles_in_ms_and_throughput_per_second() -> None:
    latencies_s = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms

    result = summarise_level(4, latencies_s, duration_s=2.0)

    assert result.concurrency == 4
    assert result.requests == 100
    assert result.duration_s == 2.0
    assert result.throughput == 50.0
    # numpy's linear interpolation over 1..100 ms
    assert result.p50_ms == pytest.approx(50.5, rel=1e-12)
    assert result.p95_ms == pytest.approx(95.05, rel=1e-12)
    assert result.p99_ms == pytest.approx(99.01, rel=1e-12)


def test_summarise_level_of_equal_latencies_has_equal_percentiles() -> None:
    result = summarise_level(1, [0.008] * 10, duration_s=0.5)

    assert (result.p50_ms, result.p95_ms, result.p99_ms) == (8.0, 8.0, 8.0)
    assert result.throughput == 20.0


def test_summarise_level_multiplies_throughput_by_the_request_batch() -> None:
    result = summarise_level(2, [0.01] * 30, duration_s=3.0, batch=8)

    assert result.throughput == 80.0
    assert result.requests == 30


def test_summarise_level_of_no_latencies_raises_inference_error_naming_the_concurrency() -> None:
    with pytest.raises(InferenceError, match="no request completed .* at concurrency 16"):
        summarise_level(16, [], duration_s=3.0)


def test_summarise_level_of_a_zero_window_raises_inference_error() -> None:
    with pytest.raises(InferenceError):
        summarise_level(1, [0.01], duration_s=0.0)


def test_level_result_to_dict_rounds_to_microsecond_precision() -> None:
    result = LevelResult(
        concurrency=2,
        throughput=123.45678,
        p50_ms=1.23456,
        p95_ms=2.0,
        p99_ms=3.99999,
        requests=7,
        duration_s=3.0004,
    )

    assert result.to_dict() == {
        "concurrency": 2,
        "throughput": 123.457,
        "p50_ms": 1.235,
        "p95_ms": 2.0,
        "p99_ms": 4.0,
        "requests": 7,
        "duration_s": 3.0,
    }


# --- property: the sweep never scores a level over the budget -----------------------------------


def _sweep(planned: list[LevelResult], budget_ms: float) -> tuple[list[LevelResult], str | None]:
    """The sweep as study.py runs it: measure levels in order until next_step gives a reason."""
    measured: list[LevelResult] = []
    reason = None
    for index, level in enumerate(planned):
        measured.append(level)
        reason = next_step(measured, budget_ms, remaining=len(planned) - index - 1)
        if reason is not None:
            break
    return measured, reason


levels_strategy = st.lists(
    st.tuples(
        st.floats(min_value=0.1, max_value=1e5, allow_nan=False, allow_infinity=False),
        st.floats(min_value=0.01, max_value=1e4, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=8,
).map(lambda pairs: [_level(2**i, throughput, p99) for i, (throughput, p99) in enumerate(pairs)])


@given(planned=levels_strategy, budget_ms=st.floats(min_value=0.5, max_value=1e3, allow_nan=False))
def test_sweep_best_never_exceeds_the_budget_and_continuing_means_within_budget(
    planned: list[LevelResult], budget_ms: float
) -> None:
    measured, reason = _sweep(planned, budget_ms)

    assert reason is not None  # every sweep ends with a stated reason
    for end in range(1, len(measured)):
        # The sweep went on past measured[end - 1], so that level was within budget.
        assert next_step(measured[:end], budget_ms, remaining=len(planned) - end) is None
        assert measured[end - 1].p99_ms <= budget_ms
    best = best_feasible(measured, budget_ms)
    feasible = [level for level in measured if level.p99_ms <= budget_ms]
    if best is None:
        assert feasible == []
    else:
        assert best.p99_ms <= budget_ms
        assert best in measured
        assert best.throughput == max(level.throughput for level in feasible)


# --- request-rate sweeps ---------------------------------------------------------------------------


def _rate_level(rate: float, throughput: float, p99_ms: float) -> LevelResult:
    return LevelResult(0, throughput, p99_ms / 2, p99_ms * 0.9, p99_ms, 100, 3.0, request_rate=rate)


def test_next_step_names_the_request_rate_that_broke_the_budget():
    levels = [_rate_level(50, 50, 5), _rate_level(100, 99, 12)]
    assert (
        next_step(levels, BUDGET_MS, remaining=2)
        == "p99 12.0 ms broke the 10 ms budget at request rate 100/s"
    )


def test_next_step_at_the_last_rate_says_so():
    assert next_step([_rate_level(50, 50, 5)], BUDGET_MS, remaining=0) == "highest request rate reached"


def test_parse_rates_accepts_positive_ascending_rates():
    assert parse_rates("12.5,50,100") == (12.5, 50.0, 100.0)


@pytest.mark.parametrize("text", ["0", "-1", "50,10", "50,50", "inf", "x"])
def test_parse_rates_refuses_what_is_not_positive_and_ascending(text):
    with pytest.raises(UsageError, match="distinct positive requests/s"):
        parse_rates(text)


def test_a_trial_of_an_open_loop_study_is_shown_at_its_rate():
    from optimizer.study.progress import format_trial
    from optimizer.study.results import TrialReport

    report = TrialReport(3, "complete", "cpu fp32", 99.0, 8.0, request_rate=100.0)
    assert format_trial(report).endswith("99.0 inf/s, p99 8.0 ms at request rate 100/s")


def test_trial_line_says_where_the_time_went():
    from optimizer.study.progress import format_trial
    from optimizer.study.results import TrialReport

    report = TrialReport(4, "complete", "cpu fp32", 99.0, 8.0, 2, load_s=1.4, measure_s=6.04, trial_s=7.61)
    assert format_trial(report).endswith("at concurrency 2 (load 1.4 s + measure 6.0 s of 7.6 s)")
    reused = TrialReport(5, "complete", "cpu fp32", 99.0, 8.0, 2)
    assert format_trial(reused).endswith("at concurrency 2")
