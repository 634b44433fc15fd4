"""The `qlinear` command line: one subcommand module per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qlinear.errors import QlinearError

#: Subcommand modules; each has `add_parser(subparsers)` that sets `func=main(args) -> int`.
_COMMANDS = ("demo", "quantize", "optimize", "run", "compare", "bench", "inspect")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="qlinear",
        description="Quantize ONNX models, fuse them into integer ops, run them on int8 kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"qlinear.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (QlinearError, OSError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"qlinear {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
