"""``vtensor serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from vtensor.cli_generate import add_engine_args, engine_kwargs

if TYPE_CHECKING:  # the engine and uvicorn load only when `serve` runs
    import uvicorn

    from vtensor.server.async_engine import AsyncEngine


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI API over HTTP")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; 0.0.0.0 exposes it)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000)
    key_help = "require 'Authorization: Bearer KEY' on /v1 (default: $VTENSOR_API_KEY)"
    p.add_argument("--api-key", default=os.environ.get("VTENSOR_API_KEY"), help=key_help)
    p.add_argument("--served-model-name", default=None, help="the model id clients send")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests beyond the running batch before 503")  # fmt: skip
    p.add_argument("--max-body-mib", type=float, default=16.0, help="request body size limit")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from vtensor.engine.config import EngineConfig
    from vtensor.engine.llm_engine import LLMEngine
    from vtensor.engine.warmup import warm_up
    from vtensor.server.app import ServerConfig, build_app

    config = ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name, max_waiting=args.max_waiting,
        max_body_bytes=int(args.max_body_mib * 2**20), shutdown_timeout_s=args.shutdown_timeout,
    )  # fmt: skip
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)))
    rt = engine.runtime
    note = " (random weights: the text is gibberish)" if rt.random_weights else ""
    print(f"model: {rt.model_name}{note}; device {rt.device}, {rt.dtype}; "
          f"max_model_len {rt.max_model_len}; attention {rt.attention_backend}",
          file=sys.stderr)  # fmt: skip
    if engine.tokenizer is None:
        print("this model has no tokenizer: send prompts as token ids", file=sys.stderr)
    print(f"prefix caching: {engine.prefix_caching_summary()}", file=sys.stderr)
    # Before the port opens, so that compiling lands on no user's first token.
    print(f"warmed up in {warm_up(engine):.1f}s", file=sys.stderr)
    app = build_app(config, engine)
    server = _server(
        app.state.engine,
        config.shutdown_timeout_s,
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=args.log_level,
            # A backstop: the engine ends the streams itself at shutdown_timeout.
            # uvicorn annotates this int but only hands it to asyncio.wait_for (a float).
            timeout_graceful_shutdown=config.shutdown_timeout_s + 5,  # type: ignore[arg-type]
        ),
    )
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, lets in-flight requests finish
    # for up to shutdown_timeout, cancels the rest (which aborts them), then the app's
    # lifespan stops the engine thread and unmaps every chunk. Afterwards it re-raises the
    # signal for the previous handler; ours turns that into a normal exit, status 0.
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        server.run()
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("vtensor serve: shut down cleanly", file=sys.stderr)
    return 0


def _server(engine: AsyncEngine, drain_s: float, config: uvicorn.Config) -> uvicorn.Server:
    """uvicorn's server, telling the engine when a graceful shutdown begins."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            engine.drain(drain_s)
            super().handle_exit(sig, frame)

    return Server(config)


class _Stopped(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped
