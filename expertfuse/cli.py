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
