import numpy as np
import pytest

from bench.noise_check import agreement
from expertfuse.timing import Measurement, describe_ratio, interleave, measure, ratio_of_medians, windows_agree


def test_windows_agree_needs_three_close_windows():
    assert not windows_agree([1.0, 1.0], 0.1)
    assert windows_agree([5.0, 1.0, 1.05, 0.97], 0.1)
    assert not windows_agree([1.0, 1.3, 1.0], 0.1)


def test_percentiles_on_constructed_samples():
    m = Measurement(latencies_s=[i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert m.percentile_ms(50) == pytest.approx(50.5)
    assert m.percentile_ms(99) == pytest.approx(99.01)
    assert m.summary(items_per_call=10)["items_per_s"] == pytest.approx(10 / 0.0505)


def test_measure_stops_when_stable_and_reports_when_not():
    calls = []
    steady = measure(lambda i: calls.append(i), warmup=2, window_s=0.0, min_calls=5)
    assert calls[:2] == [0, 1] and len(steady.window_means_s) >= 3 and len(steady.latencies_s) == 15
    growing = iter(range(1, 10_000))
    import time
    unstable = measure(lambda i: time.sleep(0.002 * next(growing) ** 2), warmup=0, window_s=0.0, min_calls=1,
                       tolerance=0.01, max_windows=4)
    assert not unstable.stable and len(unstable.window_means_s) == 4


def test_interleave_runs_every_variant_once_per_round_in_blocks_in_a_changing_order():
    log = []
    result = interleave({name: (lambda i, n=name: log.append(n)) for name in "abc"}, calls_per_block=3, warmup=1,
                        min_rounds=12, max_rounds=12, budget_s=0.0)
    timed = log[3:]  # one warm-up call each
    rounds = [timed[i:i + 9] for i in range(0, len(timed), 9)]
    assert result.rounds == 12 and len(rounds) == 12
    for r in rounds:
        blocks = [r[i:i + 3] for i in range(0, 9, 3)]
        assert all(len(set(b)) == 1 for b in blocks) and sorted(b[0] for b in blocks) == ["a", "b", "c"]
    assert len({tuple(r[::3]) for r in rounds}) > 1  # the order is drawn afresh each round
    assert all(len(result.samples_s[n]) == 12 and all(len(b) == 3 for b in result.samples_s[n]) for n in "abc")


def test_a_known_ratio_is_recovered_with_a_tight_interval():
    rng = np.random.default_rng(0)
    load = rng.uniform(1.0, 1.5, 40)  # machine load that comes and goes, hitting both variants of a round alike
    den = [list(0.010 * f * rng.normal(1, 0.01, 5)) for f in load]
    num = [list(0.030 * f * rng.normal(1, 0.01, 5)) for f in load]
    r = ratio_of_medians(num, den)
    assert r.low <= 3.0 <= r.high and r.value == pytest.approx(3.0, rel=0.05)
    assert r.reliable and r.rounds == 40 and r.samples == 400
    assert "UNRELIABLE" not in describe_ratio(r.to_dict())


def test_a_noisy_ratio_is_flagged_unreliable():
    rng = np.random.default_rng(1)
    den = [list(0.010 * rng.lognormal(0, 0.8, 3)) for _ in range(10)]
    num = [list(0.020 * rng.lognormal(0, 0.8, 3)) for _ in range(10)]
    r = ratio_of_medians(num, den)
    assert not r.reliable and r.half_width > 0.10
    assert "UNRELIABLE" in describe_ratio(r.to_dict()) and r.to_dict()["reliable"] is False


def test_noise_check_reports_the_loaded_ratio_against_the_quiet_one_both_ways():
    quiet = {"ratio": 2.63, "ci95": [2.63, 2.64]}
    loaded = {"ratio": 2.61, "ci95": [2.55, 2.65]}
    assert agreement(quiet, loaded) == {"change_pct": -0.76, "loaded_within_quiet_interval": False,
                                        "quiet_within_loaded_interval": True}
    moved = agreement(quiet, {"ratio": 2.16, "ci95": [2.09, 2.48]})
    assert moved["change_pct"] == -17.87 and not moved["quiet_within_loaded_interval"]
