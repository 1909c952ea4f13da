"""What the completion and chat handlers share: the served model, tokenizing,
``SamplingParams``, submitting and collecting, and SSE framing.

The request contract (prompt ids, length against the context, ``n`` and seeds)
is the engine's (``vtensor/engine/input_processor.py``): the handlers build the
prompt ids and one ``SamplingParams``, and the engine's ``RequestError`` becomes
a 400 naming its parameter."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

from vtensor.engine.input_processor import RequestError
from vtensor.engine.outputs import FinishReason
from vtensor.engine.params import SamplingParams
from vtensor.engine.sleep import EngineSleepingError

from .async_engine import AsyncEngine
from .errors import APIError, error_body, internal_error
from .protocol import (
    ChatCompletionChunk,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    PromptTokensDetails,
    SamplingFields,
    Usage,
)
from .served_model import ServedModel
from .submission import EngineDeadError, Item, QueueFullError, Submission

Disconnected = Callable[[], Awaitable[bool]]
Chunk = CompletionChunk | ChatCompletionChunk
StreamChoice = CompletionChoice | ChatStreamChoice
POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def sampling_params(
    req: SamplingFields, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """The request's sampling; the engine makes its ``n`` samples (and their seeds)."""
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
            top_k=req.top_k, min_p=req.min_p, seed=req.seed, stop=tuple(req.stop_list),
            stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )  # fmt: skip
    except ValueError as exc:
        raise APIError(422, str(exc)) from exc


async def submit(
    engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, prompt_param: str
) -> Submission:
    """Submit each prompt's ``params.n`` samples; the engine's contract errors are 400s
    (naming ``prompt_param`` where the engine says "prompt": chat's is "messages")."""
    try:
        return await engine.submit(prompts, params)
    except QueueFullError as exc:
        raise APIError(503, str(exc)) from exc
    except (EngineDeadError, EngineSleepingError) as exc:  # asleep: nothing was queued
        raise APIError(503, str(exc)) from exc
    except RequestError as exc:
        param = prompt_param if exc.param == "prompt" else exc.param
        raise APIError(400, str(exc), param) from exc
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


@dataclass
class ChoiceState:
    """One choice's output, accumulated from its items."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    cached_tokens: int = 0  # of the prompt, served by the prefix cache

    def add(self, item: Item) -> None:
        out = item.out
        self.cached_tokens = out.num_cached_tokens
        self.text.append(out.new_text)
        self.token_ids += out.new_token_ids
        if out.logprobs is not None:
            self.logprobs.append(out.logprobs)
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


async def batches(
    engine: AsyncEngine, sub: Submission, disconnected: Disconnected | None = None
) -> AsyncGenerator[list[Item], None]:
    """A submission's items, in batches of all that have arrived, until every choice has
    finished. Aborts the rest if the consumer stops early (a client disconnect cancels
    a stream) or, given ``disconnected``, the client has left.

    Batching matters under load: one engine step delivers a token to every running
    request, and each wake-up and socket write here holds the GIL the engine needs."""
    open_choices = len(sub.rids)
    try:
        while open_choices:
            got = await _next(sub.queue, disconnected)
            if got is None:
                return  # the client left
            arrived = [got]
            while not sub.queue.empty():
                arrived.append(sub.queue.get_nowait())
            batch: list[Item] = []
            for item in arrived:
                if isinstance(item, BaseException):
                    raise APIError(503, str(item))
                open_choices -= item.out.finished
                batch.append(item)
            yield batch
    finally:
        if open_choices:
            engine.abort(sub)
        engine.open.forget(sub)


async def collect(
    engine: AsyncEngine, sub: Submission, disconnected: Disconnected
) -> list[ChoiceState]:
    """A non-streaming request's choices, each finished (or a 503 if cut off)."""
    states = [ChoiceState() for _ in sub.rids]
    async with aclosing(batches(engine, sub, disconnected)) as stream:
        async for batch in stream:
            for item in batch:
                states[item.index].add(item)
    if any(s.finish_reason is None for s in states):
        raise APIError(503, "the request was cut off before it finished")
    return states


async def stream_events(
    engine: AsyncEngine,
    sub: Submission,
    writer: EventWriter,
    choice_of: Callable[[Item], StreamChoice],
    prompt_tokens: int,
    include_usage: bool,
    n: int = 1,
) -> AsyncGenerator[str, None]:
    """A streaming request's SSE: one write per wake-up with an event per item, the
    usage event when asked, then ``[DONE]``; an engine failure becomes an error event.
    ``n`` is the samples per prompt (choices ``p * n + j``), for the cached tokens."""
    completion = 0
    cached = [0] * len(sub.rids)
    try:
        async with aclosing(batches(engine, sub)) as stream:
            async for batch in stream:
                events = []
                for item in batch:
                    completion += len(item.out.new_token_ids)
                    cached[item.index] = item.out.num_cached_tokens
                    events.append(writer.event([choice_of(item)]))
                yield "".join(events)
    except APIError as exc:
        yield sse_error(exc)
        yield SSE_DONE
        return
    except Exception as exc:  # unexpected: details to the log, the stream ends properly
        yield sse_error(internal_error(exc, writer.rid))
        yield SSE_DONE
        return
    if include_usage:
        yield writer.event([], usage(prompt_tokens, completion, cached_per_prompt(cached, n)))
    yield SSE_DONE


async def _next(
    queue: asyncio.Queue[Item | BaseException], disconnected: Disconnected | None
) -> Item | BaseException | None:
    if disconnected is None:  # a stream: the server cancels it when the client leaves
        return await queue.get()
    while True:
        try:
            return await asyncio.wait_for(queue.get(), POLL_S)
        except TimeoutError:
            if await disconnected():
                return None


def usage(prompt: int, completion_tokens: int, cached: int = 0) -> Usage:
    """Prompt tokens count once per prompt, whatever ``n`` is (OpenAI's convention);
    so do the cached ones (``prompt_tokens_details.cached_tokens``)."""
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion_tokens,
        total_tokens=prompt + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )  # fmt: skip


def cached_per_prompt(cached: list[int], n: int) -> int:
    """The cached prompt tokens of a request, each prompt counted once: per prompt, the
    least its ``n`` samples (choices ``p * n + j``) had served from the cache."""
    return sum(min(cached[p : p + n]) for p in range(0, len(cached), n))


class EventWriter:
    """SSE events of one stream, each the stream's chunk model of ``protocol`` serialized
    by pydantic-core. On this per-token path the chunk is made once per stream and each
    event swaps in its choices (validated when they were built): validating a new chunk
    per event costs about as much as serializing it. ``TypeAdapter.dump_json`` is a
    little faster than ``model_dump_json``."""

    def __init__(self, chunk: type[Chunk], rid: str, model: str) -> None:
        # One ``created`` for the whole stream, as OpenAI's.
        self._chunk = chunk(id=rid, created=int(time.time()), model=model, choices=[])
        self._dump = _CHUNK_JSON[chunk].dump_json
        self.rid = rid

    def event(self, choices: list[StreamChoice], usage: Usage | None = None) -> str:
        self._chunk.choices, self._chunk.usage = choices, usage  # type: ignore[assignment]
        return f"data: {self._dump(self._chunk).decode()}\n\n"


_CHUNK_JSON: dict[type[Chunk], TypeAdapter[Any]] = {
    chunk: TypeAdapter(chunk) for chunk in (CompletionChunk, ChatCompletionChunk)
}

SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: APIError) -> str:
    return f"data: {json.dumps(error_body(exc.status, exc.message, exc.param))}\n\n"


def token_text(model: ServedModel, token: int) -> str:
    """A token's text for logprobs; ``token_id:N`` when there is no tokenizer (vLLM's form)."""
    if model.tokenizer is None:
        return f"token_id:{token}"
    return model.tokenizer.decode([token], skip_special_tokens=False)
