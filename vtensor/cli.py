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

    ker = bench_sub.add_parser("kernels", help="attention kernels vs SGLang and FA2 (GPU)")
    ker.add_argument("--batches", type=_int_list, default=[1, 8, 32, 128])
    ker.add_argument("--ctxs", type=_int_list, default=[1024, 4096, 16384, 32768])
    ker.add_argument("--prefixes", type=_int_list, default=[0, 1024, 4096, 16384])
    ker.add_argument("--news", type=_int_list, default=[128, 512, 2048])
    ker.add_argument("--extend-batch", type=_positive, default=4)
    ker.add_argument(
        "--budget-gib",
        type=float,
        default=64.0,
        help="GPU memory for the KV arena; larger grid points are skipped",
    )
    ker.add_argument("--json", default=None, help="write the figures to this path")
    return parser


def _int_list(text: str) -> list[int]:
    return [_positive(t) for t in text.split(",")]


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
    if args.command == "bench" and args.bench == "kernels":
        from vtensor.bench.kernels import main as bench_kernels

        return bench_kernels(args)
    raise AssertionError("unreachable: argparse validates commands")


if __name__ == "__main__":
    sys.exit(main())
