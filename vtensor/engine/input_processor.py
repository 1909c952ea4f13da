"""InputProcessor: the request contract, one for ``LLM.generate`` and the HTTP server.

A prompt (text or token ids) and its ``SamplingParams`` become the requests to
queue, or a :class:`RequestError` before anything is queued (vLLM's name for
this step of the v1 engine is the input processor). The rules:

* Text needs a tokenizer. The prompt must be non-empty, with ids in the vocabulary.
* **The limit, ``max_request_len``**: the most tokens (prompt + output) one
  request can hold: ``max_model_len``, or fewer when the KV pool cannot give one
  request that many (a request's KV must fit the pool, or it could never be
  admitted). vLLM refuses to start in that case, or with ``max_model_len=-1``
  lowers ``max_model_len`` to fit; we keep serving with the smaller limit, which
  the server advertises as its ``max_model_len``.
* **Length: refuse, never trim.** ``prompt_len + max_tokens`` must not exceed
  the limit, and the prompt must leave room for one token. A request that does
  not fit is an error (HTTP 400), as in vLLM's and OpenAI's API: silently
  generating fewer tokens than asked hides the limit from the caller, and both
  entry points then agree. ``max_tokens=None`` means "up to the limit":
  ``max_request_len - prompt_len``.
* ``n`` samples become ``n`` requests with ``n=1``; sample ``i`` of a seeded
  request uses ``seed + i``, so the samples differ and each is reproducible.

Torch-free, and it holds nothing that changes: safe to call from any thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from vtensor.kvcache.manager import KVGeometry
from vtensor.models.tokenizer import Tokenizer

from .params import SamplingParams

Prompt = str | Sequence[int]
log = logging.getLogger("vtensor.engine")


class RequestError(ValueError):
    """A request that breaks the contract; ``param`` names the field at fault (the
    server's 400 reports it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ProcessedPrompt:
    """One prompt's requests, validated: each sample's params and the shared length cap."""

    prompt_ids: tuple[int, ...]
    samples: tuple[SamplingParams, ...]  # n of them, each with n=1 and its own seed
    max_len: int  # prompt_len + max_tokens, within max_request_len


class InputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        max_model_len: int,
        kv_geometry: KVGeometry,
        warn: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        # The tokens the pool's chunks hold, all given to one request (one chunk is at
        # least one token: KVGeometry keeps whole tokens per slot).
        pool_tokens = kv_geometry.capacity_chunks * kv_geometry.chunk_size
        pool_tokens //= kv_geometry.bytes_per_token
        self.max_request_len = min(max_model_len, pool_tokens)
        if self.max_request_len < max_model_len and warn:
            log.warning(
                "the KV pool holds %d tokens for one request, less than max_model_len=%d: "
                "requests are limited to %d tokens (raise the KV budget for the full context)",
                pool_tokens, max_model_len, pool_tokens,
            )  # fmt: skip
        self.kv_geometry = kv_geometry  # what the KV manager can ever hand one request

    def process(self, prompt: Prompt, params: SamplingParams) -> ProcessedPrompt:
        ids = self.encode(prompt)
        max_len = self.check_length(len(ids), params.max_tokens)
        return ProcessedPrompt(tuple(ids), samples(params), max_len)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt``, checked against the vocabulary. A prompt whose size
        alone proves it too long is refused first, before the costly part: a text
        before it is tokenized (``check_text``), an id list before its ids are read."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(
                    "this model has no tokenizer: pass prompts as token-id lists", "prompt"
                )
            self.check_text(prompt)
            try:
                ids = self.tokenizer.encode(prompt)
            except ValueError as exc:  # not valid Unicode
                raise RequestError(str(exc), "prompt") from exc
        else:
            self.check_prompt_len(len(prompt))
            ids = [int(t) for t in prompt]
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        return ids

    def check_text(self, text: str, param: str = "prompt") -> None:
        """Refuse a text that certainly has too many tokens, without tokenizing it.

        A prompt needs fewer than ``max_request_len`` tokens, and each token covers at most
        the tokenizer's ``bytes_per_token`` bytes (``models/text_bound.py``), so a text of
        more than ``(max_request_len - 1) * bytes_per_token`` UTF-8 bytes cannot fit. Costs
        at most that many bytes of work: a text with more characters than the limit is
        refused on its length alone."""
        bound = None if self.tokenizer is None else self.tokenizer.text_bound.bytes_per_token
        if bound is None:
            return
        limit = (self.max_request_len - 1) * bound
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            raise RequestError(
                f"the text is over {limit} bytes, so it has at least {self.max_request_len} "
                f"tokens (this tokenizer's tokens cover at most {bound} bytes each), which "
                f"leaves no room to generate within {self._limit_text()}",
                param,
            )

    def check_prompt_len(self, prompt_len: int) -> None:
        """The prompt must leave room for one generated token."""
        if prompt_len >= self.max_request_len:
            raise RequestError(
                f"the prompt has {prompt_len} tokens, which leaves no room to generate "
                f"within {self._limit_text()}",
                "prompt",
            )

    def check_length(self, prompt_len: int, max_tokens: int | None) -> int:
        """The request's total-length cap, ``prompt_len + max_tokens``, if it fits."""
        limit = self.max_request_len
        self.check_prompt_len(prompt_len)
        total = limit if max_tokens is None else prompt_len + max_tokens
        if total > limit:
            raise RequestError(
                f"the prompt ({prompt_len} tokens) plus max_tokens={max_tokens} exceeds "
                f"{self._limit_text()}; ask for at most {limit - prompt_len} tokens",
                "max_tokens",
            )
        return total

    def _limit_text(self) -> str:
        """The limit, named the way the server advertises it, with its reason."""
        if self.max_request_len == self.max_model_len:
            return f"max_model_len={self.max_model_len} (this model's maximum context length)"
        return (
            f"max_model_len={self.max_request_len}: the most tokens the KV pool can hold "
            f"for one request (the model's context is {self.max_model_len}; raise the KV "
            f"budget to serve it)"
        )


def samples(params: SamplingParams) -> tuple[SamplingParams, ...]:
    """The ``n`` samples of a request: sample ``i`` has its own seed, ``seed + i``."""
    if params.n == 1:
        return (params,)
    return tuple(
        replace(params, n=1, seed=None if params.seed is None else params.seed + i)
        for i in range(params.n)
    )
