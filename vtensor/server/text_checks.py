"""Strict text: every string a request carries must be Unicode text.

JSON can spell what is not text: ``"\\ud800"`` decodes to a lone surrogate, a
code point with no UTF-8 form that a tokenizer cannot take (HF tokenizers raises a
``TypeError``) and a response cannot echo. Such a string is a client error, a 400
naming its field, wherever it enters: a prompt, chat content and content parts, a
name, a stop string, a model name, a parameter's key.

The request models (``protocol``) type every string field as ``Text`` (or
``NonEmptyText``), whose check is O(1) for ASCII text (CPython knows) and one UTF-8
encode otherwise. ``unicode_error`` finds such a failure among pydantic's errors, so
that the error handler answers 400 instead of 422, also where a string fails another
check first (a role that is not one of the literals, an unknown key).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from vtensor.models.tokenizer import invalid_unicode_at

INVALID_UNICODE = "invalid_unicode"  # our pydantic error type


def _text(value: str) -> str:
    where = invalid_unicode_at(value)
    if where is not None:
        raise PydanticCustomError(
            INVALID_UNICODE,
            "the text is not valid Unicode: a lone surrogate at index {index}",
            {"index": where},
        )
    return value


def _nonempty_text(value: str) -> str:
    if not value:
        raise PydanticCustomError("string_too_short", "the text must not be empty")
    return _text(value)


# A plain ``str`` plus the check; no ``min_length`` (a constrained str costs pydantic-core
# a UTF-8 copy of the whole text: 13 ms for 10 MB, on the event loop).
Text = Annotated[str, AfterValidator(_text)]
NonEmptyText = Annotated[str, AfterValidator(_nonempty_text)]


def unicode_error(errors: Iterable[dict[str, Any]]) -> tuple[str, str | None] | None:
    """(message, param) of the first error caused by invalid Unicode, or None.

    Our own check's errors first; then any error whose input, or whose location (an
    unknown key), is a string with a lone surrogate."""
    errors = list(errors)
    for err in errors:
        if err.get("type") == INVALID_UNICODE:
            return _message(err, err.get("msg", "")), param_of(err)
        if err.get("type") == "string_unicode":  # pydantic-core's own (a key, a literal)
            return _message(err, "the text is not valid Unicode (a lone surrogate)"), param_of(err)
    for err in errors:
        value = err.get("input")
        bad_input = isinstance(value, str) and invalid_unicode_at(value) is not None
        bad_key = any(isinstance(p, str) and invalid_unicode_at(p) is not None for p in _loc(err))
        if bad_input or bad_key:
            what = "a key" if bad_key else "the text"
            return _message(err, f"{what} is not valid Unicode (a lone surrogate)"), param_of(err)
    return None


def param_of(err: dict[str, Any]) -> str | None:
    """The field path of a pydantic error: ``messages.0.content``. pydantic adds union
    members' names to the location (``prompt.list[int]``); those are left out."""
    return ".".join(str(p) for p in _loc(err) if not _is_union_tag(p)) or None


def _loc(err: dict[str, Any]) -> list[Any]:
    return [p for p in err.get("loc", ()) if p != "body"]


def _is_union_tag(part: Any) -> bool:
    # Our field names are identifiers; pydantic's member tags are type expressions.
    return isinstance(part, str) and (
        any(c in part for c in "[-") or part in {"str", "int", "float", "bool", "list"}
    )


def _message(err: dict[str, Any], msg: str) -> str:
    param = param_of(err)
    return f"{param}: {msg}" if param else msg
