"""The HTTP side of ``vtensor bench serve``: one streamed OpenAI completion, timed.

Works against any OpenAI-compatible server: it needs ``/v1/completions`` with
streaming. ``stream_options.include_usage`` gives exact token counts where the
server supports it; otherwise the streamed events that carry a token are counted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600, sock_read=600)


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    model: str
    api_key: str | None = None
    ignore_eos: bool = True  # vLLM's extension: exact output lengths on random weights

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestResult:
    conversation: int
    turn: int
    start: float  # seconds since the benchmark began
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between streamed events
    output_ids: list[int] | None = None  # when the server returns them
    output_text: str = ""
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where reported
    accepted: bool = False  # the server answered 200
    done: bool = False  # the stream ended with [DONE]
    aborted: bool = False  # the client disconnected mid-stream on purpose (--abort-fraction)


async def fetch_model(session: aiohttp.ClientSession, base_url: str, api_key: str | None) -> str:
    """The first model the server lists (what ``--model`` defaults to)."""
    headers = Endpoint(base_url, "", api_key).headers()
    async with session.get(f"{base_url}/v1/models", headers=headers) as resp:
        body = await resp.json(content_type=None)
        if resp.status != 200:
            raise ValueError(f"GET /v1/models answered {resp.status}: {body}")
        return str(body["data"][0]["id"])


def _payload(ep: Endpoint, prompt: str | list[int], max_tokens: int, want_ids: bool) -> dict:
    body: dict[str, Any] = {
        "model": ep.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    if ep.ignore_eos:
        body["ignore_eos"] = True
    if want_ids:
        body["return_token_ids"] = True
    return body


async def complete(
    session: aiohttp.ClientSession,
    ep: Endpoint,
    prompt: str | list[int],
    max_tokens: int,
    result: RequestResult,
    t0: float,
    want_ids: bool = False,
    abort_after: int | None = None,
) -> RequestResult:
    """Send one streamed completion and fill ``result``; failures are recorded, not raised.
    With ``abort_after``, disconnect after that many token events (a client that leaves
    mid-stream: the server must abort the request and free its KV)."""
    sent = time.perf_counter()
    result.start = sent - t0
    body = _payload(ep, prompt, max_tokens, want_ids)
    try:
        url = f"{ep.base_url}/v1/completions"
        async with session.post(url, json=body, headers=ep.headers()) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            result.accepted = True
            await _read_stream(resp, result, sent, abort_after)
            if result.aborted:
                resp.close()  # drop the connection: that is how the server sees it
                return result
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - sent
    result.ok = not result.error and result.output_len > 0
    if result.ok and not isinstance(prompt, str) and not result.prompt_len:
        result.prompt_len = len(prompt)
    return result


async def _read_stream(
    resp: aiohttp.ClientResponse, result: RequestResult, sent: float, abort_after: int | None
) -> None:
    last = sent
    ids: list[int] = []
    token_events, got_ids, usage = 0, False, None
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            result.done = True
            break
        event = json.loads(data)
        if "error" in event:
            result.error = str(event["error"].get("message", event["error"]))
            return
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            # A choice carries a token unless it is a bare finish: its text may be empty
            # (no tokenizer on the server, or a partial UTF-8 character held back).
            if choice.get("text") or choice.get("token_ids") or not choice.get("finish_reason"):
                now = time.perf_counter()
                if token_events == 0:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last)
                last, token_events = now, token_events + 1
                result.output_text += choice.get("text") or ""
            if choice.get("token_ids") is not None:
                got_ids = True
                ids += choice["token_ids"]
        if abort_after is not None and token_events >= abort_after:
            result.aborted, result.output_len = True, token_events
            return
    result.output_ids = ids if got_ids else None
    if usage:
        result.prompt_len = int(usage.get("prompt_tokens") or 0)
        result.output_len = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0)
    else:
        result.output_len = len(ids) if got_ids else token_events
