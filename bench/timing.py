"""Measurement the way perf_analyzer does it: warm up, then timed windows until three in a row agree."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Measurement:
    latencies_s: list[float] = field(default_factory=list)  # per call, from the stable windows
    window_means_s: list[float] = field(default_factory=list)
    stable: bool = False

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3)

    @property
    def median_s(self) -> float:
        return statistics.median(self.latencies_s)

    def summary(self, items_per_call: int) -> dict:
        return {"p50_ms": self.percentile_ms(50), "p90_ms": self.percentile_ms(90), "p99_ms": self.percentile_ms(99),
                "items_per_s": items_per_call / self.median_s, "stable": self.stable,
                "windows": len(self.window_means_s), "calls": len(self.latencies_s)}


def windows_agree(means: list[float], tolerance: float) -> bool:
    """True when the last three window means are all within `tolerance` (relative) of their median."""
    if len(means) < 3:
        return False
    last = means[-3:]
    mid = statistics.median(last)
    return all(abs(m - mid) <= tolerance * mid for m in last)


def measure(fn: Callable[[int], object], *, warmup: int = 3, window_s: float = 1.0, min_calls: int = 3,
            tolerance: float = 0.1, max_windows: int = 10) -> Measurement:
    """Time fn(i) (i rotates the input buffer) in windows of >= window_s and >= min_calls calls."""
    for i in range(warmup):
        fn(i)
    result, calls, windows = Measurement(), warmup, []
    while len(result.window_means_s) < max_windows:
        window, started = [], time.perf_counter()
        while len(window) < min_calls or time.perf_counter() - started < window_s:
            t0 = time.perf_counter()
            fn(calls)
            window.append(time.perf_counter() - t0)
            calls += 1
        windows.append(window)
        result.window_means_s.append(statistics.fmean(window))
        if windows_agree(result.window_means_s, tolerance):
            result.stable = True
            break
    result.latencies_s = [t for w in windows[-3:] for t in w]
    return result
