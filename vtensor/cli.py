"""The ``vtensor`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtensor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)

    mem = bench_sub.add_parser("memory", help="VMM primitive costs, raw and via the mapper")
    mem.add_argument(
        "--backend",
        choices=["host", "cuda"],
        default=None,
        help="default: cuda when a GPU is present, else host",
    )
    mem.add_argument("--chunks", type=_positive, default=256, help="chunks per round")
    mem.add_argument("--repeat", type=_positive, default=5, help="rounds (median reported)")
    mem.add_argument(
        "--step", type=_positive, default=16, help="chunks per batch in the growth-pattern row"
    )
    mem.add_argument(
        "--matmuls",
        type=_positive,
        default=200,
        help="8192^3 bf16 matmuls in the CUDA overlap test",
    )
    mem.add_argument("--json", default=None, help="write the figures to this path")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench" and args.bench == "memory":
        from vtensor.bench.memory import main as bench_memory
        from vtensor.memory import NoCudaDriverError

        try:
            return bench_memory(args)
        except NoCudaDriverError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    raise AssertionError("unreachable: argparse validates commands")


if __name__ == "__main__":
    sys.exit(main())
