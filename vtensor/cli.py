"""The ``vtensor`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vtensor import cli_generate, cli_serve
from vtensor.bench import serve as bench_serve
from vtensor.bench import serve_compare
from vtensor.bench.offload_report import MODES as OFFLOAD_MODES
from vtensor.engine.config import DeviceUnavailableError
from vtensor.memory import NoCudaDriverError
from vtensor.models.config import SHAPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtensor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cli_generate.add_parser(sub)
    cli_serve.add_parser(sub)
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

    _add_kernels_parser(bench_sub)
    _add_offline_parser(bench_sub)
    _add_collectives_parser(bench_sub)
    _add_offload_parser(bench_sub)
    bench_serve.add_parser(bench_sub)
    serve_compare.add_parser(bench_sub)
    return parser


def _add_kernels_parser(bench_sub: argparse._SubParsersAction) -> None:
    ker = bench_sub.add_parser("kernels", help="attention kernels vs SGLang and FA2 (GPU)")
    ker.add_argument(
        "--batches", type=_int_list, default=None, help="decode batches (default 1,8,32,128)"
    )
    ker.add_argument(
        "--ctxs", type=_int_list, default=None, help="decode contexts (default 1024,...,32768)"
    )
    ker.add_argument(
        "--head-configs",
        type=_names("llama3-8b", "mha"),
        default=None,
        help="attention shapes: llama3-8b (32/8 GQA), mha (32/32); default both",
    )
    ker.add_argument(
        "--quick",
        action="store_true",
        help="a small grid: llama3-8b, batches 1,8,32, contexts 4096,16384, no extend "
        "(explicit --batches/--ctxs/--head-configs still win)",
    )
    ker.add_argument("--prefixes", type=_int_list, default=[0, 1024, 4096, 16384])
    ker.add_argument("--news", type=_int_list, default=[128, 512, 2048])
    ker.add_argument("--extend-batch", type=_positive, default=4)
    ker.add_argument(
        "--budget-gib",
        type=float,
        default=64.0,
        help="GPU memory for each KV arena (dense, then vmm); larger grid points are skipped",
    )
    ker.add_argument(
        "--arenas",
        type=_names("dense", "vmm"),
        default=["dense", "vmm"],
        help="KV memory to run on: dense (torch.empty, max_len = ctx), vmm (a VMM KVArena "
        "as the engine's, max_len = max_model_len), or dense,vmm (default)",
    )
    ker.add_argument(
        "--max-model-len",
        type=_positive,
        default=8192,
        help="the max_model_len of the vmm arena's engine (default: Llama-3-8B's 8192); "
        "contexts beyond it use their own length",
    )
    ker.add_argument(
        "--decode-configs",
        default="",
        help='decode launch candidates to sweep under CUDA-graph replay at every point: "all" '
        "(vtensor/bench/kernel_candidates.py) or comma-separated names such as "
        "n64-w4-s3-m64 (DecodeConfig.name) or n64-w4-s3-m64+waves8",
    )
    ker.add_argument("--skip-extend", action="store_true", help="decode points only")
    ker.add_argument("--json", default=None, help="write the figures to this path")


def _add_offline_parser(bench_sub: argparse._SubParsersAction) -> None:
    off = bench_sub.add_parser("offline", help="engine throughput, decode vs floor, vs HF")
    cli_generate.add_engine_args(off)
    off.add_argument("--num-prompts", type=_positive, default=1000)
    off.add_argument("--input-len", type=_positive, default=1024)
    off.add_argument("--output-len", type=_positive, default=128)
    off.add_argument(
        "--workload",
        action="append",
        type=_int_pair,
        default=None,
        help="extra IN,OUT length pair (repeatable); runs after --input-len/--output-len",
    )
    off.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        help="a random prefix of this many tokens shared by every throughput prompt "
        "(vLLM's --random-prefix-len: a shared system prompt); the prompts' own tokens "
        "follow it",
    )
    off.add_argument(
        "--compare-prefix-caching",
        nargs="?",
        type=_positive,
        const=1,
        default=0,
        metavar="REPEATS",
        help="run each throughput workload with prefix caching off and on, on one engine, "
        "each from an empty cache, REPEATS pairs (default 1: off, on; 2: off, on, on, off; "
        "alternating, so that a drift favours neither), and print the gain",
    )
    off.add_argument("--decode-batches", type=_int_list, default=[1, 16, 64, 256])
    off.add_argument("--decode-ctx", type=_positive, default=1024)
    off.add_argument("--decode-steps", type=_positive, default=32)
    off.add_argument("--decode-sync", default=True, action=argparse.BooleanOptionalAction,
                     help="also time decode batches with synchronous steps")  # fmt: skip
    off.add_argument(
        "--skip-throughput",
        action="store_true",
        help="only the decode table (and the HF peer): no throughput workloads",
    )
    off.add_argument(
        "--hf-peer",
        type=_names("eager", "compiled"),
        default=["eager", "compiled"],
        help="HF generate paths to time: eager, compiled, or eager,compiled (default)",
    )
    off.add_argument("--no-hf-peer", dest="hf_peer", action="store_const", const=[])
    off.add_argument(
        "--hf-compile-timeout",
        type=float,
        default=300.0,
        help="seconds for each batch's compiled HF run (compile, warm-up and timing); "
        "past it the run is recorded as a timeout",
    )
    off.add_argument("--json", default=None, help="write the figures to this path")


def _add_collectives_parser(bench_sub: argparse._SubParsersAction) -> None:
    col = bench_sub.add_parser(
        "collectives", help="the TP group's bus bandwidth and a decode step's collectives"
    )
    col.add_argument("--tensor-parallel-size", "-tp", type=_positive, default=2)
    col.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="cuda: NCCL (default with GPUs); cpu: gloo, a smoke test")  # fmt: skip
    col.add_argument("--shapes", type=_names(*SHAPES), default=["llama3-8b", "llama3-70b"])
    col.add_argument("--batches", type=_int_list, default=[1, 16, 64, 256])
    col.add_argument("--sizes-mib", type=_int_list, default=[1, 16, 256, 1024],
                     help="all-reduce sizes for the bus bandwidth (largest counts)")  # fmt: skip
    col.add_argument("--iters", type=_positive, default=20)
    col.add_argument("--json", default=None, help="write the figures to this path")


def _add_offload_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "offload", help="weight offload under a GPU budget: decode/prefill vs floor and naive peer"
    )
    p.add_argument("--shape", default="llama3-8b",
                   help="random weights of a known shape (embedded: the tiny model)")  # fmt: skip
    p.add_argument("--model", default=None, help="a HF checkpoint instead of --shape")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--budgets", type=_int_list, default=None,
                   help="percent of the weight bytes, each plus the ring and the workspace; "
                        "100 gives the compute floor (default 100,75,50,25)")  # fmt: skip
    p.add_argument("--big", action="store_true",
                   help="a Llama-3-70B shape larger than the GPU, at --budget-gib")  # fmt: skip
    p.add_argument("--budget-gib", type=float, default=None,
                   help="--big's budget (default: GPU memory - KV - 10 GiB)")  # fmt: skip
    p.add_argument("--batches", type=_int_list, default=None, help="default 1,16,64")
    p.add_argument("--decode-ctx", type=_positive, default=None, help="default 128")
    p.add_argument("--decode-steps", type=_positive, default=None, help="default 4")
    p.add_argument("--prefill-tokens", type=_positive, default=None, help="default 2048")
    p.add_argument("--reps", type=_positive, default=None, help="timed prefills (median; 2)")
    p.add_argument("--prefill-stream", type=_positive, default=None,
                   help="prompts prefilled back to back: the prefill throughput (6)")  # fmt: skip
    p.add_argument("--modes", type=_names(*OFFLOAD_MODES), default=None,
                   help="graphs,eager (the prefetcher), naive (accelerate's synchronous "
                        "copies from pageable memory), naive-pinned (default: all; with "
                        "--big all but naive: its pageable copy would not fit)")  # fmt: skip
    p.add_argument("--ring-depth", type=_positive, default=2)
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV pool (default 6 GiB, 10 with --big; CPU: 256 MiB)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="a small grid (tests, smoke runs): budgets 100,50, batches 1,4, short "
                        "windows, 128-token prefill; explicit options still win")  # fmt: skip
    p.add_argument("--json", default=None, help="write the figures to this path")


def _names(*allowed: str) -> Callable[[str], list[str]]:
    """A comma-separated list of ``allowed`` names (argparse type)."""

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        if not names or any(n not in allowed for n in names):
            raise argparse.ArgumentTypeError(f"expected some of {','.join(allowed)}, got {text}")
        return names

    return parse


def _int_pair(text: str) -> tuple[int, int]:
    values = _int_list(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected IN,OUT, got {text}")
    return values[0], values[1]


def _int_list(text: str) -> list[int]:
    return [_positive(t) for t in text.split(",")]


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    # Bad input and missing devices are the user's to fix: one line, exit 2, no traceback.
    except (
        ValueError,
        FileNotFoundError,
        MemoryError,
        DeviceUnavailableError,
        NoCudaDriverError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        return cli_generate.main(args)
    if args.command == "serve":
        return cli_serve.main(args)
    if args.command == "bench" and args.bench == "offline":
        from vtensor.bench.offline import main as bench_offline

        args.workloads = [(args.input_len, args.output_len), *(args.workload or [])]
        return bench_offline(args)
    if args.command == "bench" and args.bench == "serve":
        return bench_serve.main(args)
    if args.command == "bench" and args.bench == "compare":
        return serve_compare.main(args)
    if args.command == "bench" and args.bench == "memory":
        from vtensor.bench.memory import main as bench_memory

        return bench_memory(args)
    if args.command == "bench" and args.bench == "collectives":
        from vtensor.bench.collectives import main as bench_collectives

        return bench_collectives(args)
    if args.command == "bench" and args.bench == "offload":
        from vtensor.bench.offload import main as bench_offload

        return bench_offload(args)
    if args.command == "bench" and args.bench == "kernels":
        from vtensor.bench.kernels import main as bench_kernels

        return bench_kernels(args)
    raise AssertionError("unreachable: argparse validates commands")


if __name__ == "__main__":
    sys.exit(main())
