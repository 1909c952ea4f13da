"""``vtensor bench serve``: load an OpenAI-compatible server, measure what users feel.

Requests arrive all at once (rate inf) or with gamma-distributed gaps of shape
``burstiness`` (1 is Poisson); ``max_concurrency`` caps those in flight. A
comma list of rates runs a sweep. Prints vLLM's "Serving Benchmark Result"
table per run, and writes JSON (and a PNG with ``--plot``).

As a soak: ``--abort-fraction F`` makes that fraction of requests disconnect
mid-stream (after a random number of tokens, seeded), and ``--check-metrics``
checks the server's ``/metrics`` after each run (``serve_check``): no request
lost, no KV live. Either failing makes the command exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from .serve_workloads import DATASETS, Conversation, WorkloadArgs


@dataclass(frozen=True)
class RunArgs:
    request_rate: float  # requests (single-turn) or conversations (multiturn) per second
    burstiness: float
    max_concurrency: int | None
    seed: int
    abort_fraction: float = 0.0  # requests that disconnect mid-stream

    def __post_init__(self) -> None:
        if self.request_rate <= 0 or self.burstiness <= 0:
            raise ValueError("request rate and burstiness must be positive")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if not 0 <= self.abort_fraction < 1:
            raise ValueError("abort_fraction must be in [0, 1)")


def arrival_times(n: int, run: RunArgs) -> list[float]:
    """Start offsets: all zero at rate inf, else cumulative gamma(burstiness) gaps."""
    if run.request_rate == float("inf"):
        return [0.0] * n
    rng = random.Random(run.seed)
    theta = 1.0 / (run.request_rate * run.burstiness)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(run.burstiness, theta)
    return out


async def run_workload(
    ep: Any, convs: list[Conversation], run: RunArgs, tokenizer: Any, progress: bool
) -> tuple[list[Any], float]:
    """Every conversation from its arrival time, its turns in order; returns the results
    and the wall time from the first send to the last answer."""
    import aiohttp  # here, not at the top: `vtensor --help` need not load the client
    from tqdm import tqdm

    from .serve_client import TIMEOUT

    limit = asyncio.Semaphore(run.max_concurrency or 10**9)
    total = sum(len(c.turns) for c in convs)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        bar = tqdm(total=total, desc="requests", unit="req", disable=not progress, file=sys.stderr)
        t0 = time.perf_counter()
        aborts = abort_points(convs, run)
        tasks = [
            _conversation(session, ep, i, c, start, t0, limit, tokenizer, bar, aborts[i])
            for i, (c, start) in enumerate(zip(convs, arrival_times(len(convs), run)))
        ]
        nested = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    return [r for rs in nested for r in rs], duration


def abort_points(convs: list[Conversation], run: RunArgs) -> list[list[int | None]]:
    """Per conversation and turn: after how many token events the client disconnects
    (None: it reads to the end). A fraction ``abort_fraction`` of the requests with at
    least 2 output tokens, each after 1 to output - 1 tokens: mid-stream. Seeded."""
    rng = random.Random(run.seed + 1)  # not the arrivals' stream
    return [
        [rng.randint(1, n - 1) if n > 1 and rng.random() < run.abort_fraction else None
         for n in c.output_lens]
        for c in convs
    ]  # fmt: skip


async def _conversation(
    session: Any, ep: Any, index: int, conv: Conversation, start: float, t0: float,
    limit: asyncio.Semaphore, tokenizer: Any, bar: Any, aborts: list[int | None],
) -> list[Any]:  # fmt: skip
    """One client: its turns in order, each prompt the previous prompt + answer + question."""
    from .serve_client import RequestResult, complete

    await asyncio.sleep(max(0.0, t0 + start - time.perf_counter()))
    multi = len(conv.turns) > 1
    history_ids: list[int] = []
    history_text = ""
    results = []
    for turn, (question, out_len) in enumerate(zip(conv.turns, conv.output_lens)):
        if tokenizer is not None:
            prompt: str | list[int] = history_text + tokenizer.decode(question)
        else:
            prompt = history_ids + question
        async with limit:
            r = await complete(session, ep, prompt, out_len, RequestResult(index, turn, 0.0),
                               t0, want_ids=multi and tokenizer is None,
                               abort_after=aborts[turn])  # fmt: skip
        bar.update(1)
        results.append(r)
        if not r.ok or r.aborted:
            break  # the conversation cannot go on without its answer
        if multi and tokenizer is None and r.output_ids is None:
            raise ValueError(
                "the server returned no token ids for a multi-turn prompt "
                "(return_token_ids); pass --tokenizer DIR to send text instead"
            )
        history_ids = [*history_ids, *question, *(r.output_ids or [])]
        history_text = f"{prompt}{r.output_text}" if isinstance(prompt, str) else ""
    return results


def parse_rates(text: str) -> list[float]:
    rates = [float(t) for t in text.split(",")]
    if any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be positive, got {text}")
    return rates


def add_parser(bench_sub: Any) -> None:
    p = bench_sub.add_parser("serve", help="load an OpenAI-compatible server (TTFT/TPOT/ITL)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server, without /v1")
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=DATASETS, default="random")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024, help="random: prompt length")
    p.add_argument("--output-len", type=int, default=128, help="random: output length")
    p.add_argument("--range-ratio", type=float, default=0.0, help="random: length spread")
    p.add_argument("--num-clients", type=int, default=256, help="multiturn")
    p.add_argument("--num-rounds", type=int, default=5, help="multiturn")
    p.add_argument("--question-len", type=int, default=512, help="multiturn")
    p.add_argument("--answer-len", type=int, default=64, help="multiturn")
    p.add_argument("--num-groups", type=int, default=64, help="shared-prefix")
    p.add_argument("--prompts-per-group", type=int, default=16, help="shared-prefix")
    p.add_argument("--system-len", type=int, default=2048, help="shared-prefix")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="token ids are drawn below this (without --tokenizer)")  # fmt: skip
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer dir: send text prompts instead of token ids")  # fmt: skip
    p.add_argument("--request-rate", type=parse_rates, default=[float("inf")],
                   help="req/s (inf: all at once); a comma list runs a sweep")  # fmt: skip
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--abort-fraction", type=float, default=0.0,
                   help="this fraction of requests disconnects mid-stream (a soak)")  # fmt: skip
    p.add_argument("--check-metrics", action="store_true",
                   help="after each run, read /metrics: fail if a request was lost or KV "
                        "is still live (vtensor servers; no other clients)")  # fmt: skip
    p.add_argument("--check-timeout", type=float, default=60.0,
                   help="seconds to wait for the server to go idle before the check")  # fmt: skip
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send vLLM's ignore_eos (for servers that reject it)")  # fmt: skip
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput bound")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="a name for this run in the JSON and plot")
    p.add_argument("--json", default=None, help="write the results to this path")
    p.add_argument("--plot", default=None, help="write a PNG of latency against request rate")


def workload_args(args: Any) -> WorkloadArgs:
    return WorkloadArgs(
        dataset=args.dataset, num_prompts=args.num_prompts, vocab_size=args.vocab_size,
        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
        num_clients=args.num_clients, num_rounds=args.num_rounds,
        question_len=args.question_len, answer_len=args.answer_len,
        num_groups=args.num_groups, prompts_per_group=args.prompts_per_group,
        system_len=args.system_len, seed=args.seed,
    )  # fmt: skip


def main(args: Any) -> int:
    from .serve_report import run_all

    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run_all(args, workload_args(args)))
    print("interrupted", file=sys.stderr)
    return 130
