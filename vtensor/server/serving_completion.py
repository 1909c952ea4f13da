"""``/v1/completions``: prompts (text or token ids, one or a batch) in, text out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .async_engine import AsyncEngine
from .protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
)
from .served_model import ServedModel
from .serving_common import (
    ChoiceState,
    Disconnected,
    EventWriter,
    cached_per_prompt,
    collect,
    sampling_params,
    stream_events,
    submit,
    token_text,
    usage,
)
from .submission import Item, Submission


async def create_completion(
    req: CompletionRequest, model: ServedModel, engine: AsyncEngine, disconnected: Disconnected
) -> CompletionResponse | AsyncIterator[str]:
    """Validate, submit, and answer: a response, or the SSE lines of a stream."""
    model.check_name(req.model)
    params = sampling_params(req, req.max_tokens, req.logprobs)
    prompts = [await model.encode(p) for p in req.prompts()]
    # Choice index p * n + j is sample j of prompt p, as OpenAI numbers them.
    sub = await submit(engine, prompts, params, "prompt")
    prompt_tokens = sum(map(len, prompts))
    if req.stream:
        return _stream(req, model, engine, sub, prompts, prompt_tokens)
    states = await collect(engine, sub, disconnected)
    choices = [_choice(req, model, i, s, prompts[i // req.n]) for i, s in enumerate(states)]
    completion = sum(len(s.token_ids) for s in states)
    cached = cached_per_prompt([s.cached_tokens for s in states], req.n)
    return CompletionResponse(
        id=new_id("cmpl"), model=model.name, choices=choices,
        usage=usage(prompt_tokens, completion, cached),
    )  # fmt: skip


def _choice(
    req: CompletionRequest, model: ServedModel, index: int, s: ChoiceState, prompt: list[int]
) -> CompletionChoice:
    return CompletionChoice(
        index=index,
        text="".join(s.text),
        logprobs=_logprobs(model, s.token_ids, s.logprobs, 0) if req.logprobs is not None else None,
        finish_reason=s.finish_reason,
        stop_reason=s.stop_reason,
        token_ids=s.token_ids if req.return_token_ids else None,
        prompt_token_ids=prompt if req.return_token_ids else None,
    )


def _logprobs(
    model: ServedModel, tokens: list[int], entries: list[dict[int, float]], offset: int
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: the sampled token's, and the top-k (plus it) per position."""
    out = CompletionLogprobs()
    for token, entry in zip(tokens, entries):
        text = token_text(model, token)
        out.tokens.append(text)
        out.token_logprobs.append(entry[token])
        out.top_logprobs.append({token_text(model, t): lp for t, lp in entry.items()})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _stream(
    req: CompletionRequest,
    model: ServedModel,
    engine: AsyncEngine,
    sub: Submission,
    prompts: list[list[int]],
    prompt_tokens: int,
) -> AsyncIterator[str]:
    writer = EventWriter(CompletionChunk, new_id("cmpl"), model.name)
    offsets = [0] * (len(prompts) * req.n)  # text offsets of each choice, for logprobs

    def choice_of(item: Item) -> CompletionChoice:
        return _stream_choice(req, model, item, offsets, prompts[item.index // req.n])

    return stream_events(engine, sub, writer, choice_of, prompt_tokens, req.include_usage, req.n)


def _stream_choice(
    req: CompletionRequest, model: ServedModel, item: Item, offsets: list[int], prompt: list[int]
) -> CompletionChoice:
    """One choice of a stream event: the item's new text (and its finish, if it ended)."""
    out, i = item.out, item.index
    logprobs = None
    if req.logprobs is not None and out.logprobs is not None:
        logprobs = _logprobs(model, out.new_token_ids, [out.logprobs], offsets[i])
        offsets[i] += sum(map(len, logprobs.tokens))
    return CompletionChoice(
        index=i,
        text=out.new_text,
        logprobs=logprobs,
        finish_reason=out.finish_reason if out.finished else None,
        stop_reason=out.stop_reason if out.finished else None,
        token_ids=out.new_token_ids if req.return_token_ids else None,
        prompt_token_ids=prompt if req.return_token_ids and out.finished else None,
    )
