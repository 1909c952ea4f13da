"""``/v1/chat/completions``: messages through the model's chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from .async_engine import AsyncEngine
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    TokenLogprob,
    TopLogprob,
    new_id,
)
from .served_model import ServedModel
from .serving_common import (
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


async def create_chat_completion(
    req: ChatCompletionRequest, model: ServedModel, engine: AsyncEngine, disconnected: Disconnected
) -> ChatCompletionResponse | AsyncIterator[str]:
    model.check_name(req.model)
    params = sampling_params(req, req.max_new_tokens, req.num_logprobs)
    ids = await model.render_chat(req.template_messages(), req.add_generation_prompt)
    sub = await submit(engine, [ids], params, "messages")
    if req.stream:
        return _stream(req, model, engine, sub, len(ids))
    states = await collect(engine, sub, disconnected)
    choices = [
        ChatChoice(
            index=i,
            message=ChatResponseMessage(content="".join(s.text)),
            logprobs=_logprobs(model, s.token_ids, s.logprobs) if req.logprobs else None,
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason,
            token_ids=s.token_ids if req.return_token_ids else None,
        )
        for i, s in enumerate(states)
    ]
    return ChatCompletionResponse(
        id=new_id("chatcmpl"), model=model.name, choices=choices,
        usage=usage(
            len(ids),
            sum(len(s.token_ids) for s in states),
            cached_per_prompt([s.cached_tokens for s in states], req.n),
        ),
        prompt_token_ids=ids if req.return_token_ids else None,
    )  # fmt: skip


def _logprobs(
    model: ServedModel, tokens: list[int], entries: list[dict[int, float]]
) -> ChatLogprobs:
    content = []
    for token, entry in zip(tokens, entries):
        tops = [_top(model, t, lp) for t, lp in entry.items()]
        top = _top(model, token, entry[token])
        content.append(TokenLogprob(**top.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)


def _top(model: ServedModel, token: int, logprob: float) -> TopLogprob:
    text = token_text(model, token)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))


async def _stream(
    req: ChatCompletionRequest,
    model: ServedModel,
    engine: AsyncEngine,
    sub: Submission,
    prompt_tokens: int,
) -> AsyncIterator[str]:
    writer = EventWriter(ChatCompletionChunk, new_id("chatcmpl"), model.name)
    # OpenAI's first event per choice names the role and carries no text.
    for i in range(req.n):
        first = ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
        yield writer.event([first])
    events = stream_events(
        engine, sub, writer, lambda item: _stream_choice(req, model, item), prompt_tokens,
        req.include_usage, req.n,
    )  # fmt: skip
    async with aclosing(events) as stream:  # closing this stream closes (aborts) that one
        async for event in stream:
            yield event


def _stream_choice(req: ChatCompletionRequest, model: ServedModel, item: Item) -> ChatStreamChoice:
    """One choice of a stream event: the item's new text (and its finish, if it ended)."""
    out = item.out
    logprobs = None
    if req.logprobs and out.logprobs is not None:
        logprobs = _logprobs(model, out.new_token_ids, [out.logprobs])
    token_ids = out.new_token_ids if req.return_token_ids else None
    return ChatStreamChoice(
        index=item.index,
        delta=ChatDelta(content=out.new_text, token_ids=token_ids),
        logprobs=logprobs,
        finish_reason=out.finish_reason if out.finished else None,
    )
