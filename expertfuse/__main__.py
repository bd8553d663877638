"""expertfuse COMMAND [ARGS]: one entry point for every stage.

  expertfuse train ...            python -m train
  expertfuse convert ...          python -m train.convert
  expertfuse export [onnx|trt] .. python -m export.onnx / export.trt
  expertfuse serve ...            python -m serve
  expertfuse client ...           python -m serve.client
  expertfuse bench ...            python -m bench
  expertfuse demo ...             python -m bench.demo

The stage modules are run by name (runpy), so this bottom package imports none of them.
"""
from __future__ import annotations

import runpy
import sys

COMMANDS = {"train": "train", "convert": "train.convert", "export": "export.onnx", "export-onnx": "export.onnx",
            "export-trt": "export.trt", "serve": "serve", "client": "serve.client", "bench": "bench",
            "tune": "bench.tune", "demo": "bench.demo"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "export" and rest and rest[0] in ("onnx", "trt"):
        command, rest = f"export-{rest[0]}", rest[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose from {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    sys.argv = [f"expertfuse {command}", *rest]
    try:
        runpy.run_module(COMMANDS[command], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
