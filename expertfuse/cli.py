"""The one command-line runner and the argparse types every entry point shares."""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from expertfuse.errors import UserError


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: the run unwinds like Ctrl-C, so every `finally` stops what it started."""


def run_cli(main: Callable[[], object]) -> int:
    """Run an entry point: a UserError becomes one line on stderr and its exit code, Ctrl-C exits 130 and
    SIGTERM (where unwind_on_signals() turned it into Terminated) 143."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("stopped by SIGTERM", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def unwind_on_signals() -> None:
    """Ctrl-C and SIGTERM raise in the main thread at any moment (KeyboardInterrupt, Terminated), for commands
    whose cleanup lives in `finally` blocks and context managers. Later signals are ignored: they must not cut
    that cleanup short."""
    def on_signal(signum, _frame) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def int_list(text: str) -> list[int]:
    """argparse type: '1,8,64' -> [1, 8, 64]."""
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a count of processes)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (a duration, a budget, a timeout)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_int_list(text: str) -> list[int]:
    """argparse type: '0,1000' -> [0, 1000], at least one value and every value >= 0."""
    values = int_list(text)
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def positive_int_list(text: str) -> list[int]:
    """argparse type: '1,8,64' -> [1, 8, 64], at least one value and every value >= 1."""
    values = int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """argparse type: 'a,b' -> ['a', 'b'], at least one name (an empty list is not a silent 'all')."""
    values = [v for v in text.split(",") if v]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def choice_list(choices: tuple[str, ...]):
    """argparse type: 'a,b' -> ['a', 'b'], each one of `choices`."""
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        if not values or set(values) - set(choices):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return values
    return parse
