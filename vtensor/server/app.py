"""The FastAPI application: routes, the middlewares (``auth``: the API key, first;
``body_limit``), and the lifespan that starts and stops the engine thread and the
tokenizer workers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from vtensor.engine.llm_engine import LLMEngine

from .async_engine import AsyncEngine
from .auth import APIKeyAuth, open_paths
from .body_limit import BodyLimit
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
from .routing import ModelRoutes, Route, label_metrics
from .served_model import ServedModel
from .serving_chat import create_chat_completion
from .serving_completion import create_completion
from .sleep_routes import sleep_router
from .submission import EngineDeadError


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: an open port serves anyone who finds it
    port: int = 8000
    api_key: str | None = None  # every route but /health (and /metrics) needs it
    protect_metrics: bool = False  # /metrics needs the key too
    served_model_name: str | None = None
    # With several engines (``vtensor serve --model A --model B``): one name per engine,
    # in order; empty: each engine's model name.
    served_model_names: tuple[str, ...] = ()
    max_waiting: int = 1024  # queued requests beyond the running batch; more get 503
    max_body_bytes: int = 16 * 2**20
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long to finish
    tokenizer_workers: int = 4  # threads that tokenize off the event loop (served_model.py)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.protect_metrics and self.api_key is None:
            raise ValueError("protect_metrics needs an api_key")
        if self.max_waiting < 1 or self.max_body_bytes < 1024:
            raise ValueError("max_waiting must be >= 1 and max_body_bytes >= 1024")
        if self.shutdown_timeout_s < 0:
            raise ValueError("shutdown_timeout_s must be >= 0")
        if self.tokenizer_workers < 1:
            raise ValueError("tokenizer_workers must be >= 1")


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


def build_app(config: ServerConfig, engine: LLMEngine | Sequence[LLMEngine]) -> FastAPI:
    """The app; the engine threads start with the app's lifespan and close the engines.
    Several engines: one per served model, routed by the request's ``model``."""
    routes = _routes(config, [engine] if isinstance(engine, LLMEngine) else list(engine))
    model, runner = routes.first.model, routes.first.runner

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for r in routes.routes:
            r.runner.start()
        try:
            yield
        finally:
            for r in routes.routes:
                r.model.close()
            for r in routes.routes:
                await r.runner.stop()

    app = FastAPI(title="vtensor", version="0.1.0", lifespan=lifespan)
    app.state.engine = runner  # the first model's (the only one's)
    app.state.engines = [r.runner for r in routes.routes]
    app.state.model = model
    install_handlers(app)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.api_key is not None:  # added last: the outermost, before anything reads
        app.add_middleware(
            APIKeyAuth, api_key=config.api_key, open_paths=open_paths(config.protect_metrics)
        )
    app.include_router(_v1_router(routes))
    app.include_router(_plain_router(routes))
    app.include_router(_admin_router(routes))
    if routes.single:  # sleep mode is one engine's: a multi-model server has no such routes
        app.include_router(sleep_router(runner))
    return app


def _routes(config: ServerConfig, engines: list[LLMEngine]) -> ModelRoutes:
    names: Sequence[str | None] = config.served_model_names or [None] * len(engines)
    if len(engines) == 1 and not config.served_model_names:
        names = [config.served_model_name]
    if len(names) != len(engines):
        raise ValueError(f"{len(names)} served model names for {len(engines)} models")
    routes = []
    for engine, name in zip(engines, names):
        metrics = ServerMetrics()
        model = ServedModel.of(engine, name, config.tokenizer_workers)
        routes.append(Route(model, AsyncEngine(engine, config.max_waiting, metrics), metrics))
    return ModelRoutes(routes)


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.name, created=model.created, max_model_len=model.max_model_len)


def _v1_router(routes: ModelRoutes) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[_card(r.model) for r in routes.routes])

    # ``:path``: a model id may hold slashes (``meta-llama/Llama-3.1-8B``).
    @router.get("/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def model_card(model_id: str) -> ModelCard:
        return _card(routes.get(model_id).model)

    @router.post("/completions", response_model=None, responses=_stream_doc(CompletionResponse))
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        r = routes.get(req.model)
        return _answer(await create_completion(req, r.model, r.runner, raw.is_disconnected))

    @router.post(
        "/chat/completions", response_model=None, responses=_stream_doc(ChatCompletionResponse)
    )
    async def chat(req: ChatCompletionRequest, raw: Request) -> Any:
        r = routes.get(req.model)
        return _answer(await create_chat_completion(req, r.model, r.runner, raw.is_disconnected))

    return router


async def _exposition(r: Route) -> str:
    runner = r.runner
    try:
        stats, memory = await runner.call(
            lambda: (runner.engine.stats(), runner.engine.memory_stats())
        )
    except RuntimeError as exc:
        raise APIError(503, str(exc)) from exc
    return r.metrics.render(stats, time.perf_counter(), memory)


def _plain_router(routes: ModelRoutes) -> APIRouter:
    router = APIRouter()

    @router.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> JSONResponse:
        if not all(r.runner.alive for r in routes.routes):
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/metrics", response_class=PlainTextResponse, responses=ERRORS)
    async def prometheus() -> PlainTextResponse:
        if routes.single:  # one model: its exposition as it always was, unlabelled
            body = await _exposition(routes.first)
        else:
            body = label_metrics([(r.model.name, await _exposition(r)) for r in routes.routes])
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    @router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        model = routes.get(req.model).model
        if req.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = await model.render_chat(messages, req.add_generation_prompt)
        else:
            prompt = req.prompt or ""
            ids = await model.encode(prompt, add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids)

    @router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        model = routes.get(req.model).model
        return DetokenizeResponse(prompt=await model.decode(req.tokens))

    return router


def _admin_router(routes: ModelRoutes) -> APIRouter:
    """Operations on the server's state: they need the API key (``auth.APIKeyAuth``
    covers every route but ``open_paths``)."""
    router = APIRouter()

    @router.post("/reset_prefix_cache", responses={409: {"model": ErrorResponse}, **ERRORS})
    async def reset_prefix_cache() -> JSONResponse:
        """vLLM's route: drop every cached prefix, so that its KV chunks go back to the
        pool. Only while no request runs (409 otherwise: nothing is dropped)."""
        try:
            done = [await r.runner.call(r.runner.engine.reset_prefix_cache) for r in routes.routes]
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        if not all(done):
            raise APIError(409, "requests are running; reset the prefix cache when idle")
        return JSONResponse({"success": True})

    return router


def _answer(result: Any) -> Any:
    if isinstance(result, AsyncIterator):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(result, media_type="text/event-stream", headers=headers)
    return JSONResponse(result.model_dump(mode="json"))
