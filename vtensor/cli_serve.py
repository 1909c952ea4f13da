"""``vtensor serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from vtensor.cli_generate import add_engine_args, engine_kwargs, serve_if_worker

if TYPE_CHECKING:
    from vtensor.engine.llm_engine import LLMEngine

FORCED_EXIT_STATUS = 130  # 128 + SIGINT: what a shell reports for an interrupted command


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API over HTTP")
    add_engine_args(p, several_models=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; 0.0.0.0 exposes it)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000)
    key_help = ("require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                "(default: $VTENSOR_API_KEY)")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("VTENSOR_API_KEY"), help=key_help)
    p.add_argument("--protect-metrics", action="store_true",
                   help="/metrics needs the API key too (default: open, for scrapers)")  # fmt: skip
    p.add_argument("--served-model-name", action="append", default=None,
                   help="the model id clients send; with several --model, one per model "
                        "in the same order (default: each --model)")  # fmt: skip
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests beyond the running batch before 503")  # fmt: skip
    p.add_argument("--max-body-mib", type=float, default=16.0, help="request body size limit")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(args: argparse.Namespace) -> int:
    models: list[str | None] = list(args.model or [None])
    names: list[str] = list(args.served_model_name or [])
    if names and len(names) != len(models):
        print(f"vtensor serve: {len(names)} --served-model-name for {len(models)} --model",
              file=sys.stderr)  # fmt: skip
        return 2
    args.model = models[0]
    if len(models) == 1 and serve_if_worker(engine_kwargs(args)):
        return 0  # other nodes' ranks: no HTTP, rank 0 serves
    return _serve(args, models, names)


def _serve(args: argparse.Namespace, models: list[str | None], names: list[str]) -> int:
    import uvicorn

    from vtensor.engine.warmup import warm_up
    from vtensor.server.app import ServerConfig, build_app
    from vtensor.server.shutdown import Server

    _log_to_stderr(args.log_level)

    several = len(models) > 1
    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key,
        protect_metrics=args.protect_metrics,
        served_model_name=None if several or not names else names[0],
        served_model_names=tuple(names) if several else (), max_waiting=args.max_waiting,
        max_body_bytes=int(args.max_body_mib * 2**20), shutdown_timeout_s=args.shutdown_timeout,
    )  # fmt: skip
    engines = _build_engines(args, models, names)
    for engine in engines:
        _describe(engine)
        # Before the port opens, so that compiling lands on no user's first token.
        print(f"warmed up in {warm_up(engine):.1f}s", file=sys.stderr)
    app = build_app(config, engines)
    # Move everything start-up made (torch, the model, the app) out of the collector's
    # sight: a full collection over that heap stalls every stream for ~130 ms (CPU,
    # measured), and its objects live as long as the process anyway.
    gc.collect()
    gc.freeze()
    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=args.log_level,
            # A backstop: the engine ends the streams itself at shutdown_timeout.
            # uvicorn annotates this int but only hands it to asyncio.wait_for (a float).
            timeout_graceful_shutdown=config.shutdown_timeout_s + 5,  # type: ignore[arg-type]
        ),
        app.state.engines,
        config.shutdown_timeout_s,
    )
    # uvicorn handles SIGINT/SIGTERM (server/shutdown.py): a drain, then the app's lifespan
    # stops the engine thread and unmaps every chunk. Afterwards it re-raises the signal for
    # the previous handler; ours turns that into a normal return.
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        server.run()
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        gc.unfreeze()  # let the interpreter's last collection see everything again
    if server.forced is not None:
        print(f"vtensor serve: {server.forced.describe()}", file=sys.stderr)
        return FORCED_EXIT_STATUS
    print("vtensor serve: shut down cleanly", file=sys.stderr)
    return 0


def _build_engines(
    args: argparse.Namespace, models: list[str | None], names: list[str]
) -> list[LLMEngine]:
    """One engine; or, with several models, one per model on one ``SharedKVPool`` whose
    budget is ``--kv-cache-gib`` (needed on a GPU: no engine can size it alone)."""
    from vtensor.engine.config import EngineConfig
    from vtensor.engine.kv_setup import CPU_KV_BYTES
    from vtensor.engine.llm_engine import LLMEngine
    from vtensor.engine.shared_pool import SharedKVPool

    kwargs = engine_kwargs(args)
    if len(models) == 1:
        return [LLMEngine(EngineConfig(**kwargs))]
    budget = kwargs.pop("kv_cache_bytes")
    if budget is None and args.device != "cpu":
        raise SystemExit("vtensor serve: several --model share one KV budget: give --kv-cache-gib")
    pool = SharedKVPool(budget or CPU_KV_BYTES, device=args.device)
    engines: list[LLMEngine] = []
    try:
        for i, model in enumerate(models):
            name = names[i] if names else model
            config = EngineConfig(**{**kwargs, "model": model})
            engines.append(LLMEngine(config, kv_pool=pool, name=name))
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return engines


def _describe(engine: LLMEngine) -> None:
    rt = engine.runtime
    note = " (random weights: the text is gibberish)" if rt.random_weights else ""
    print(f"model: {rt.model_name}{note}; device {rt.device}, {rt.dtype}; "
          f"max_model_len {rt.max_model_len}; attention {rt.attention_backend}",
          file=sys.stderr)  # fmt: skip
    if engine.offload is not None:
        print(engine.offload.placement.describe(), file=sys.stderr)
    if engine.tokenizer is None:
        print("this model has no tokenizer: send prompts as token ids", file=sys.stderr)
    print(f"prefix caching: {engine.prefix_caching_summary()}", file=sys.stderr)


def _log_to_stderr(level: str) -> None:
    """The server's own log lines (drain, forced exit, internal errors), like uvicorn's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format("%(message)s"))
    logger = logging.getLogger("vtensor")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname + ':':<9} {super().format(record)}"  # uvicorn's layout


class _Stopped(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped
