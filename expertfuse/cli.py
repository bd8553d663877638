"""The one command-line runner and the argparse types every entry point shares."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from expertfuse.errors import UserError


def run_cli(main: Callable[[], object]) -> int:
    """Run an entry point: a UserError becomes one line on stderr and its exit code, Ctrl-C exits 130."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def int_list(text: str) -> list[int]:
    """argparse type: '1,8,64' -> [1, 8, 64]."""
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a count of processes)."""
    values = positive_int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def positive_int_list(text: str) -> list[int]:
    """argparse type: '1,8,64' -> [1, 8, 64], at least one value and every value >= 1."""
    values = int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (seconds of a window or a budget)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def choice_list(choices: tuple[str, ...]):
    """argparse type: 'a,b' -> ['a', 'b'], each one of `choices`."""
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        if not values or set(values) - set(choices):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}, got {text!r}")
        return values
    return parse
