"""Entry-point wrapper: user errors become one line on stderr and their exit code (2), never a traceback."""
from __future__ import annotations

import sys
from collections.abc import Callable

from train.errors import UserError


def run_cli(main: Callable[[], object]) -> int:
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
