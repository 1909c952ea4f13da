"""OpenAI-style errors: every failure is ``{"error": {message, type, param, code}}``.

Status codes:
- 400: malformed JSON, an unsupported parameter, a prompt over the context;
- 401: a missing or wrong API key;  404: an unknown model or route;
- 413: a body over the size limit;  422: a wrong type or an out-of-range value;
- 503: the waiting queue is full, or the engine is not running.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import ErrorInfo, ErrorResponse

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
        message=message, type=ERROR_TYPES.get(status, "error"), param=param, code=status
    )
    return ErrorResponse(error=info).model_dump()


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
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def validation_status(errors: Any) -> tuple[int, str, str | None]:
    """Map pydantic's errors to (status, message, param): syntax and unknown
    parameters are the client's request being wrong (400); the rest are values (422)."""
    errors = list(errors)
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
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
