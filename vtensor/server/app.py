"""The FastAPI application: routes, the API key, the body limit, and the lifespan
that starts and stops the engine thread."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vtensor.engine.llm_engine import LLMEngine

from .async_engine import AsyncEngine
from .errors import APIError, error_body, install_handlers
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .serving_chat import create_chat_completion, render_chat
from .serving_common import ServedModel
from .serving_completion import create_completion


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: an open port serves anyone who finds it
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting: int = 1024  # queued requests beyond the running batch; more get 503
    max_body_bytes: int = 16 * 2**20
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long to finish

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.max_waiting < 1 or self.max_body_bytes < 1024:
            raise ValueError("max_waiting must be >= 1 and max_body_bytes >= 1024")
        if self.shutdown_timeout_s < 0:
            raise ValueError("shutdown_timeout_s must be >= 0")


def served_model(engine: LLMEngine, name: str | None) -> ServedModel:
    return ServedModel(
        name=name or engine.runtime.model_name,
        max_model_len=engine.runtime.max_model_len,
        vocab_size=engine.model_config.vocab_size,
        tokenizer=engine.tokenizer,
        created=int(time.time()),
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 503)
}


# One server-sent event: ``data`` is one JSON piece of the response, or "[DONE]" at the end.
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}},
    "required": ["data"],
}


def _stream_doc(model: type) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"model": model, "content": {"text/event-stream": {"schema": SSE_EVENT}}},
        **ERRORS,
    }


def build_app(config: ServerConfig, engine: LLMEngine) -> FastAPI:
    """The app; the engine thread starts with the app's lifespan and closes the engine."""
    model = served_model(engine, config.served_model_name)
    metrics = ServerMetrics()
    runner = AsyncEngine(engine, config.max_waiting, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await runner.stop()

    app = FastAPI(title="vtensor", version="0.1.0", lifespan=lifespan)
    app.state.engine = runner
    app.state.model = model
    install_handlers(app)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.include_router(_v1_router(config, model, runner))
    app.include_router(_plain_router(model, runner, metrics))
    app.include_router(_admin_router(config, runner))
    return app


def _v1_router(config: ServerConfig, model: ServedModel, runner: AsyncEngine) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth(config.api_key))])

    @router.get("/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        card = ModelCard(id=model.name, created=model.created, max_model_len=model.max_model_len)
        return ModelList(data=[card])

    @router.post("/completions", response_model=None, responses=_stream_doc(CompletionResponse))
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return _answer(await create_completion(req, model, runner, raw.is_disconnected))

    @router.post(
        "/chat/completions", response_model=None, responses=_stream_doc(ChatCompletionResponse)
    )
    async def chat(req: ChatCompletionRequest, raw: Request) -> Any:
        return _answer(await create_chat_completion(req, model, runner, raw.is_disconnected))

    return router


def _plain_router(model: ServedModel, runner: AsyncEngine, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> JSONResponse:
        if not runner.alive:
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/metrics", response_class=PlainTextResponse, responses=ERRORS)
    async def prometheus() -> PlainTextResponse:
        try:
            stats = await runner.call(runner.engine.stats)
        except RuntimeError as exc:
            raise APIError(503, str(exc)) from exc
        body = metrics.render(stats, time.perf_counter())
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    @router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        model.check_name(req.model)
        if req.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = render_chat(messages, model, req.add_generation_prompt)
        else:
            tok = model.need_tokenizer()
            ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids)

    @router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        model.check_name(req.model)
        if any(not 0 <= t < model.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {model.vocab_size})", "tokens")
        text = model.need_tokenizer().decode(req.tokens, skip_special_tokens=False)
        return DetokenizeResponse(prompt=text)

    return router


def _admin_router(config: ServerConfig, runner: AsyncEngine) -> APIRouter:
    """Operations on the server's state: they need the API key, like /v1."""
    router = APIRouter(dependencies=[Depends(_auth(config.api_key))])

    @router.post("/reset_prefix_cache", responses={409: {"model": ErrorResponse}, **ERRORS})
    async def reset_prefix_cache() -> JSONResponse:
        """vLLM's route: drop every cached prefix, so that its KV chunks go back to the
        pool. Only while no request runs (409 otherwise: nothing is dropped)."""
        try:
            done = await runner.call(runner.engine.reset_prefix_cache)
        except RuntimeError as exc:
            raise APIError(503, str(exc)) from exc
        if not done:
            raise APIError(409, "requests are running; reset the prefix cache when idle")
        return JSONResponse({"success": True})

    return router


def _answer(result: Any) -> Any:
    if isinstance(result, AsyncIterator):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(result, media_type="text/event-stream", headers=headers)
    return JSONResponse(result.model_dump(mode="json"))


def _auth(api_key: str | None) -> Any:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant-time comparison: the key must not leak through response timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required: Authorization: Bearer KEY")

    return check


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length when sent and by
    counting otherwise (an upload in HTTP chunked transfer encoding cannot get around it)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI passes HTTPExceptions from body reading through
                raise StarletteHTTPException(413, f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(413, f"the request body is over {self.limit} bytes")
        await JSONResponse(body, status_code=413)(scope, receive, send)
