"""Timing, defined once for export and bench.

Two tools:
- `measure`: one variant's latency distribution the way perf_analyzer measures, warm-up then timed
  windows until three in a row agree (absolute p50/p90/p99 and throughput);
- `interleave` + `ratio`: a comparison of variants that survives a noisy shared machine. The variants
  run in short blocks, in a fresh random order every round, so load that comes and goes hits all of
  them alike; a ratio is the ratio of medians with a 95% bootstrap interval over rounds (rounds are
  resampled as pairs, keeping each round's variants together).
"""
from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

RELIABLE_HALF_WIDTH = 0.10  # a ratio whose 95% interval reaches further than +-10% is flagged unreliable
MIN_ROUNDS = 10  # an interleaved run with fewer rounds measured nothing worth a ratio or a percentile
# Two candidates whose latency ratio lies within +-5% (its 95% interval) are a tie: timing them longer would not
# change which one is worth serving.
TIE_WITHIN = 0.05
MAX_EXTENSION = 4  # a run short of MIN_ROUNDS at the end of its budget may go on to 4 x the budget


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


@dataclass
class Interleaved:
    """Per-call latencies of several variants, [round][call] each, measured in alternating blocks; `min_rounds`:
    how many rounds it needed to count as measured."""
    samples_s: dict[str, list[list[float]]]
    min_rounds: int = MIN_ROUNDS
    elapsed_s: float = 0.0

    @property
    def rounds(self) -> int:
        return len(next(iter(self.samples_s.values())))

    @property
    def measured(self) -> bool:
        return self.rounds >= self.min_rounds

    @property
    def not_measured(self) -> str | None:
        """Why this run gives no figure (None when it does)."""
        return None if self.measured else (f"{self.rounds} interleaved rounds in {self.elapsed_s:.1f} s (at least "
                                           f"{self.min_rounds} needed): give it a longer --budget-s")

    def median_s(self, name: str) -> float:
        return float(np.median([t for block in self.samples_s[name] for t in block]))

    def summary(self, name: str, items_per_call: int) -> dict:
        flat = np.array([t for block in self.samples_s[name] for t in block])
        return {"p50_ms": float(np.percentile(flat, 50) * 1e3), "p90_ms": float(np.percentile(flat, 90) * 1e3),
                "p99_ms": float(np.percentile(flat, 99) * 1e3), "items_per_s": items_per_call / float(np.median(flat)),
                "calls": int(flat.size), "rounds": self.rounds, "measured": True}


SETTLED_EVERY = 5  # rounds between two checks of an interleaved run's `settled`


def interleave(variants: dict[str, Callable[[int], object]], *, calls_per_block: int = 3, warmup: int = 2,
               min_rounds: int = MIN_ROUNDS, max_rounds: int = 200, budget_s: float = 10.0, max_s: float = float("inf"),
               seed: int = 0, settled: Callable[["Interleaved"], bool] | None = None) -> Interleaved:
    """Run every variant in blocks of `calls_per_block` calls, all variants once per round in a random order,
    until `budget_s` seconds or `max_rounds` have passed, or, once `min_rounds` are in, `settled` says the run
    already answers its question (checked every SETTLED_EVERY rounds); a run short of `min_rounds` by then is
    extended up to `max_s` seconds, and one still short is returned as it is (`measured` false)."""
    rng = random.Random(seed)
    names = list(variants)
    for name in names:
        for i in range(warmup):
            variants[name](i)
    samples: dict[str, list[list[float]]] = {name: [] for name in names}
    started, call = time.perf_counter(), warmup
    while len(samples[names[0]]) < max_rounds and (time.perf_counter() - started < budget_s or (
            len(samples[names[0]]) < min_rounds and time.perf_counter() - started < max_s)):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            block = []
            for _ in range(calls_per_block):
                t0 = time.perf_counter()
                variants[name](call)
                block.append(time.perf_counter() - t0)
                call += 1
            samples[name].append(block)
        done = len(samples[names[0]])
        if settled and done >= min_rounds and done % SETTLED_EVERY == 0 and settled(
                Interleaved(samples, min_rounds, time.perf_counter() - started)):
            break
    return Interleaved(samples, min_rounds, time.perf_counter() - started)


@dataclass
class Ratio:
    """numerator / denominator of median latencies, with its 95% bootstrap interval."""
    value: float
    low: float
    high: float
    rounds: int
    samples: int

    @property
    def half_width(self) -> float:
        """The interval's larger relative distance from the value."""
        return max(self.high / self.value - 1, 1 - self.low / self.value) if self.value > 0 else float("inf")

    @property
    def reliable(self) -> bool:
        return self.half_width <= RELIABLE_HALF_WIDTH

    def to_dict(self) -> dict:
        return {"ratio": self.value, "ci95": [self.low, self.high], "rounds": self.rounds, "samples": self.samples,
                "reliable": self.reliable}


def describe_ratio(r: dict) -> str:
    """A ratio as Ratio.to_dict() writes it: '2.91x [2.80, 3.02] n=120', flagged when it is not reliable."""
    text = f"{r['ratio']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] n={r['samples']}"
    return text if r["reliable"] else f"{text} UNRELIABLE (interval wider than +-{100 * RELIABLE_HALF_WIDTH:.0f}%)"


def ratio_of_medians(numerator: list[list[float]], denominator: list[list[float]], *, boot: int = 2000,
                     seed: int = 0) -> Ratio:
    """median(numerator) / median(denominator) over paired rounds, bootstrapping rounds for the interval."""
    return geomean_ratio_of_medians([(numerator, denominator)], boot=boot, seed=seed)


def geomean_ratio_of_medians(pairs: list[tuple[list[list[float]], list[list[float]]]], *, boot: int = 2000,
                             seed: int = 0) -> Ratio:
    """The geometric mean over `pairs` of median(numerator) / median(denominator) (e.g. one pair per batch size),
    over paired rounds, bootstrapping rounds (the same ones for every pair) for the interval."""
    rounds = min(len(blocks) for pair in pairs for blocks in pair)
    draws = np.vstack([np.arange(rounds), np.random.default_rng(seed).integers(0, rounds, (boot, rounds))])
    log_ratios = np.mean([np.log(_medians_of_draws(num[:rounds], draws) / _medians_of_draws(den[:rounds], draws))
                          for num, den in pairs], axis=0)  # row 0: the rounds as measured; then each resample
    low, high = np.percentile(np.exp(log_ratios[1:]), [2.5, 97.5])
    samples = sum(len(b) for pair in pairs for blocks in pair for b in blocks[:rounds])
    return Ratio(float(np.exp(log_ratios[0])), float(low), float(high), rounds, int(samples))


def _medians_of_draws(blocks: list[list[float]], draws: np.ndarray) -> np.ndarray:
    """For each row of round indices, the median of those rounds' samples together (all rows at once where every
    round holds as many samples)."""
    if len({len(b) for b in blocks}) == 1:
        return np.median(np.asarray(blocks, dtype=float)[draws].reshape(len(draws), -1), axis=1)
    arrays = [np.asarray(b, dtype=float) for b in blocks]
    return np.array([np.median(np.concatenate([arrays[j] for j in row])) for row in draws])


def ratio(result: Interleaved, numerator: str, denominator: str, **kwargs) -> Ratio:
    """The latency ratio numerator / denominator of two interleaved variants."""
    return ratio_of_medians(result.samples_s[numerator], result.samples_s[denominator], **kwargs)


def pick_fastest(runners: dict[str, Callable[[np.ndarray], object]], inputs: dict[int, np.ndarray],
                 budget_s: float = 6.0) -> tuple[str, dict[str, dict[int, float]]]:
    """The candidate with the lowest geometric-mean median latency over the batch sizes in `inputs`, every
    (candidate, batch) pair interleaved with the others, for `budget_s` or until that choice is settled: against
    every other candidate, the leader's geometric-mean latency ratio is faster beyond noise (its 95% interval's
    upper end below 1, from 5 rounds on) or a tie (the whole interval within 1 +- TIE_WITHIN, from MIN_ROUNDS
    rounds on: a narrow interval from few rounds is no proof of a tie). Returns (best, medians in seconds)."""
    variants = {(name, b): (lambda i, run=run, x=x: run(x)) for name, run in runners.items() for b, x in inputs.items()}

    def medians_of(run: Interleaved) -> dict[str, dict[int, float]]:
        return {name: {b: run.median_s(f"{name}@{b}") for b in inputs} for name in runners}

    def leader(medians: dict[str, dict[int, float]]) -> str:
        return min(medians, key=lambda name: float(np.mean(np.log(list(medians[name].values())))))

    def faster_or_tied(best: str, other: str, run: Interleaved) -> bool:
        r = geomean_ratio_of_medians([(run.samples_s[f"{best}@{b}"], run.samples_s[f"{other}@{b}"]) for b in inputs],
                                     boot=400)
        return r.high < 1 or (run.rounds >= MIN_ROUNDS and r.low > 1 - TIE_WITHIN and r.high < 1 + TIE_WITHIN)

    def settled(run: Interleaved) -> bool:
        best = leader(medians_of(run))
        return all(faster_or_tied(best, other, run) for other in runners if other != best)
    keyed = interleave({f"{n}@{b}": fn for (n, b), fn in variants.items()}, calls_per_block=2, min_rounds=5,
                       budget_s=budget_s, settled=settled)
    medians = medians_of(keyed)
    return leader(medians), medians


def describe_choice(medians: dict[str, dict[int, float]], best: str) -> str:
    """What pick_fastest measured, for the log: 'loop b1 1.20 ms, b32 9.80 ms; grouped ... -> grouped'."""
    return "; ".join(f"{name} " + ", ".join(f"b{b} {t * 1e3:.2f} ms" for b, t in per.items())
                     for name, per in medians.items()) + f" -> {best}"
