"""HTTP errors with a JSON body naming the problem: {"error": code, "message": text}."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

log = structlog.get_logger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": code, "message": message} | extra, status_code=status, headers=headers)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def _where(err: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(loc) or "body"


def body_problem(errors: Sequence[Mapping[str, Any]]) -> JSONResponse:
    """Malformed JSON is a 400; a well-formed body the models refuse (unknown or bad fields) a 422."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return error_response(400, "malformed_json", f"the body is not valid JSON: {detail}".rstrip(": "))
    problems = [{"field": _where(e), "problem": e.get("msg", ""), "type": e.get("type")} for e in errors]
    summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
    return error_response(422, "invalid_request", summary, problems=problems)


class InvalidBody(Exception):
    def __init__(self, errors: Sequence[Mapping[str, Any]]) -> None:
        super().__init__("invalid body")
        self.errors = errors


async def invalid_body_handler(request: Request, exc: InvalidBody) -> JSONResponse:
    return body_problem(exc.errors)


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    return body_problem(list(exc.errors()))


async def unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    """Logged with its traceback; the client gets no detail (it could name a database or a key)."""
    log.exception("gateway.unexpected_error", path=request.url.path, error_class=type(exc).__name__)
    return error_response(500, "internal_error", "the gateway could not handle this request; it is logged")
