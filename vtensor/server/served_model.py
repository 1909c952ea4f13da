"""The served model as the handlers see it: its name and limits, and its tokenizer run
on a bounded set of worker threads, off the event loop.

Tokenizing is the one costly thing a handler does with a request's text (seconds for
megabytes), and on the event loop it stalls every stream and ``/health`` for as long.
So text goes through here:

1. a cheap size check first, on the loop (``InputProcessor.check_text``: a text whose
   byte count proves it longer than the context is refused without tokenizing; it costs
   at most the limit's bytes of work), then
2. the tokenizer (and the chat template) on one of ``workers`` threads. HF tokenizers
   releases the GIL while it encodes, so the loop keeps running; only turning the ids
   into a Python list holds it, for milliseconds (measured on the CPU: encoding 1 MB of
   text took 0.59 s on a thread, and a loop ticking every 1 ms beside it waited at most
   22 ms). At most ``workers`` texts are tokenized at once; more wait their turn
   without holding a thread.

Token-id prompts need no worker: their length is checked on the loop (O(1)) before the
engine reads their ids.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from vtensor.engine.input_processor import InputProcessor, RequestError
from vtensor.engine.llm_engine import LLMEngine
from vtensor.models.tokenizer import Tokenizer

from .errors import APIError

T = TypeVar("T")


@dataclass(frozen=True)
class ServedModel:
    """What the handlers know about the model (runtime-derived, read-only)."""

    name: str
    # What one request may hold (the engine's max_request_len), advertised as max_model_len.
    max_model_len: int
    vocab_size: int
    tokenizer: Tokenizer | None
    inputs: InputProcessor  # the engine's request contract (torch-free, thread-safe)
    workers: ThreadPoolExecutor
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def of(cls, engine: LLMEngine, name: str | None, workers: int) -> ServedModel:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vtensor-tokenizer")
        return cls(
            name=name or engine.runtime.model_name,
            max_model_len=engine.inputs.max_request_len,
            vocab_size=engine.model_config.vocab_size,
            tokenizer=engine.tokenizer,
            inputs=engine.inputs,
            workers=pool,
        )

    def close(self) -> None:
        self.workers.shutdown(wait=False, cancel_futures=True)

    def check_name(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise APIError(404, f"model {requested!r} does not exist; this server serves "
                                f"{self.name!r}", "model")  # fmt: skip

    def need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send prompts as token ids")
        return self.tokenizer

    # ------------------------------------------------------------ on the workers
    async def encode(
        self, prompt: str | Sequence[int], param: str = "prompt", add_special_tokens: bool = True
    ) -> list[int]:
        """A prompt's token ids (the engine checks them against the vocabulary)."""
        if not isinstance(prompt, str):
            _checked(self.inputs.check_prompt_len, len(prompt), param=param)
            return list(prompt)
        tok = self.need_tokenizer()
        _checked(self.inputs.check_text, prompt, param, param=param)
        return await self._run(tok.encode, prompt, add_special_tokens, param=param)

    async def render_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool
    ) -> list[int]:
        """The messages through the chat template, checked for size, then tokenized:
        all on a worker (the template's output is only known once it has run)."""
        tok = self.need_tokenizer()

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt)
            except ValueError as exc:  # no template, or the template refused the messages
                raise APIError(400, str(exc), "messages") from exc
            except Exception as exc:  # a jinja2 error inside the template
                raise APIError(400, f"the chat template failed: {exc}", "messages") from exc
            self.inputs.check_text(text, "messages")
            # The template writes the special tokens (BOS included) itself.
            return tok.encode(text, add_special_tokens=False)

        return await self._run(render, param="messages")

    async def decode(self, tokens: list[int]) -> str:
        tok = self.need_tokenizer()

        def run() -> str:
            if any(not 0 <= t < self.vocab_size for t in tokens):
                raise APIError(400, f"token ids must be in [0, {self.vocab_size})", "tokens")
            return tok.decode(tokens, skip_special_tokens=False)

        return await self._run(run, param="tokens")

    async def _run(self, fn: Callable[..., T], *args: object, param: str) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.workers, fn, *args)
        except RequestError as exc:
            raise APIError(400, str(exc), exc.param or param) from exc
        except ValueError as exc:  # the tokenizer's: not valid Unicode
            raise APIError(400, str(exc), param) from exc


def _checked(check: Callable[..., None], *args: object, param: str) -> None:
    """Run one of the engine's cheap checks; its ``RequestError`` is a 400."""
    try:
        check(*args)
    except RequestError as exc:
        raise APIError(400, str(exc), param) from exc
