"""vLLM's sleep-mode routes: ``POST /sleep?level=N``, ``POST /wake_up``, ``GET
/is_sleeping`` (``engine/sleep.py`` says what sleeping gives back).

They change the server's state, so they need the API key like every route but the
open ones (``auth.APIKeyAuth``). Each runs on the engine thread between steps, so
it never meets a half-done step. Answers:

* ``/sleep``: 200 (empty body, as vLLM's); 409 while a request is waiting or
  running (nothing is dropped: retry when idle) or when already asleep; 400 for a
  level other than 1 or 2, or when the engine was built without sleep mode;
* ``/wake_up``: 200 (also when awake: nothing to do);
* ``/is_sleeping``: ``{"is_sleeping": bool}``.

While asleep, completions and chat answer 503 (``serving_common.submit``) and queue
nothing; after ``/wake_up`` the same request succeeds.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from vtensor.engine.sleep import EngineBusyError, EngineSleepingError, SleepModeError

from .async_engine import AsyncEngine
from .errors import APIError
from .protocol import ErrorResponse
from .submission import EngineDeadError

RESPONSES: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 409, 503)
}


def sleep_router(runner: AsyncEngine) -> APIRouter:
    router = APIRouter()

    @router.post("/sleep", response_class=Response, responses=RESPONSES)
    async def sleep(level: str = "1") -> Response:
        """Drop all KV and give the weights' memory back (level 1: a copy stays in host
        memory; level 2: reloaded on wake)."""
        try:
            number = int(level)
        except ValueError:
            raise APIError(400, f"level must be 1 or 2, got {level!r}", "level") from None
        if number not in (1, 2):
            raise APIError(400, f"level must be 1 or 2, got {number}", "level")
        try:
            await runner.call(lambda: runner.engine.sleep(number))
        except (EngineBusyError, EngineSleepingError) as exc:
            raise APIError(409, str(exc)) from exc
        except SleepModeError as exc:
            raise APIError(400, str(exc)) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        return Response(status_code=200)

    @router.post("/wake_up", response_class=Response, responses=RESPONSES)
    async def wake_up() -> Response:
        """Map the weights back (KV returns on demand); nothing to do when awake."""
        try:
            await runner.call(runner.engine.wake_up)
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        return Response(status_code=200)

    @router.get("/is_sleeping", responses=RESPONSES)
    async def is_sleeping() -> JSONResponse:
        try:
            asleep = await runner.call(lambda: runner.engine.is_sleeping)
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        return JSONResponse({"is_sleeping": asleep})

    return router
