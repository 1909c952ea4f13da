"""Host cost of a stream's SSE chunks: build and serialize N chunks (CPU only, no engine).

python3 benchmarks/bench_stream_chunks.py --chunks 10000 --repeat 10

Feeds N one-token items (the last one finished) through the completion and chat
streaming handlers and prints the best CPU time per chunk: the per-token path of
``vtensor serve``, whose writes hold the GIL that the engine thread needs.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from vtensor.engine.outputs import StepOutput
from vtensor.models.embedded import embedded_tokenizer
from vtensor.server import serving_chat, serving_completion
from vtensor.server.protocol import ChatCompletionRequest, CompletionRequest
from vtensor.server.serving_common import ServedModel
from vtensor.server.submission import Item, Submission


class _NoEngine:
    def abort(self, submission: Submission) -> None:
        raise AssertionError("every item finishes, nothing is aborted")


def _submission(n: int, logprobs: bool) -> Submission:
    queue: asyncio.Queue[Item | BaseException] = asyncio.Queue()
    for i in range(n):
        last = i == n - 1
        lp = {65: -0.25, 66: -1.5, 67: -2.0} if logprobs else None
        out = StepOutput(0, [65], " ab", last, "length" if last else None, None, lp)
        queue.put_nowait(Item(0, out))
    return Submission([0], queue)


async def _drain(events: AsyncIterator[str]) -> int:
    return sum([len(e) async for e in events])


def _time(make: Callable[[], AsyncIterator[str]], repeat: int) -> tuple[float, int]:
    """Best CPU time of draining the stream (wall time swings on a shared machine), and
    its SSE bytes."""
    best, size = float("inf"), 0
    for _ in range(repeat):
        events = make()  # the queue is built before the clock starts
        t0 = time.process_time()
        size = asyncio.run(_drain(events))
        best = min(best, time.process_time() - t0)
    return best, size


def _cases(n: int) -> dict[str, Callable[[], AsyncIterator[str]]]:
    tok = embedded_tokenizer()
    model = ServedModel("bench", 4096, tok.vocab_size, tok, 0)
    engine: Any = _NoEngine()
    usage = {"stream_options": {"include_usage": True}}
    cmpl = CompletionRequest(prompt="hi", stream=True, **usage)
    cmpl_lp = CompletionRequest(prompt="hi", stream=True, logprobs=2, **usage)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stream=True,
                                 **usage)  # fmt: skip
    return {
        "completion": lambda: serving_completion._stream(
            cmpl, model, engine, _submission(n, False), [[1]], 1
        ),
        "completion+logprobs": lambda: serving_completion._stream(
            cmpl_lp, model, engine, _submission(n, True), [[1]], 1
        ),
        "chat": lambda: serving_chat._stream(chat, model, engine, _submission(n, False), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    for name, make in _cases(args.chunks).items():
        best, size = _time(make, args.repeat)
        per = best / args.chunks * 1e6
        print(f"{name:20s} {per:6.2f} us/chunk  ({best * 1e3:7.1f} ms, {size} bytes)")


if __name__ == "__main__":
    main()
