"""OpenAI-style errors: every failure is ``{"error": {message, type, param, code}}``.

Status codes:
- 400: malformed JSON, an unsupported parameter, a prompt over the context, text that
  is not valid Unicode;
- 401: a missing or wrong API key;  404: an unknown model or route;
- 413: a body over the size limit;  422: a wrong type or an out-of-range value;
- 503: the waiting queue is full, or the engine is not running.
- 500: anything unexpected: a generic message with an id; the details go to the log.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorInfo, ErrorResponse
from .text_checks import param_of, unicode_error

log = logging.getLogger("vtensor.server")
_REQUEST_ID = re.compile(r"[\w.:-]{1,128}")  # what a client's id may be to reach the log

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    info = ErrorInfo(
        message=_printable(message),
        type=ERROR_TYPES.get(status, "error"),
        param=None if param is None else _printable(param),
        code=status,
    )
    return ErrorResponse(error=info).model_dump()


def _printable(text: str) -> str:
    """``text`` with any lone surrogate (from a client's input) as a ``\\udXXX`` escape:
    a response must be valid UTF-8, whatever the request held."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        status, message, param = validation_status(exc.errors())
        return error_response(status, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Keep the exception's headers: a 405 must say which methods are allowed.
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        err = internal_error(exc, request.headers.get("x-request-id"))
        return error_response(err.status, err.message)


def internal_error(exc: BaseException, request_id: str | None) -> APIError:
    """An unexpected error. Its details (type, message, traceback) may hold anything,
    another request's text included, so they go to the log only, under an id that the
    client gets: the client's own ``X-Request-Id`` if it sent a usable one, else the
    stream's id, else a new one."""
    rid = request_id if request_id and _REQUEST_ID.fullmatch(request_id) else None
    rid = rid or f"err-{uuid.uuid4().hex[:16]}"
    log.error("internal error (request id %s)", rid, exc_info=exc)
    return APIError(500, f"internal server error (request id {rid}); see the server's log")


def validation_status(errors: Any) -> tuple[int, str, str | None]:
    """Map pydantic's errors to (status, message, param): syntax and unknown
    parameters are the client's request being wrong (400); the rest are values (422)."""
    errors = list(errors)
    bad_text = unicode_error(errors)
    if bad_text is not None:
        return 400, *bad_text
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = param_of(first)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return 400, f"malformed JSON: {first.get('msg', '')}", None
    if kind == "extra_forbidden":
        return 400, f"unsupported parameter: {param}", param
    if kind == "missing" and not loc:
        return 400, "the request needs a JSON body", None
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, f"{where}{first.get('msg', 'invalid value')}{more}", param
