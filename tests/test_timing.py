import pytest

from expertfuse.timing import Measurement, measure, windows_agree


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
