"""HTTP error answers of the Serve application: the error body (ours, plus OpenAI's on the OpenAI
path), the exception handlers serve/app.py registers on the router's FastAPI app, the request-body
size limit (ASGI middleware), and the one-line public reason for a failed generator call.
"""

# No `from __future__ import annotations` here, as in serve/app.py: Ray Serve and FastAPI read
# annotations at runtime.
import json
import re
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from catimage.errors import CatimageError
from serve.schemas import MAX_BODY_BYTES

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w]*\.)+[A-Za-z_]\w*: ")
_HOST_PORT = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b|\blocalhost(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")


def _clean(text: str) -> str:
    """Text safe to send: no lone surrogates (they cannot be encoded as UTF-8 JSON)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def public_reason(err: BaseException) -> str:
    """One line for the client about a failed generator call, without internal addresses.

    Ray wraps replica errors in a long traceback: keep its last line, then replace every URL and
    host:port by a placeholder (the full error goes to the router's log, not to the client).
    """
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError

    if isinstance(err, BackPressureError):
        return "overloaded: its request queue is full (max_queued_requests)"
    if isinstance(err, ActorDiedError | ActorUnavailableError | RayActorError):
        return "its replica died or became unreachable (Serve replaces it)"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = _QUALIFIED.sub("", lines[-1] if lines else "")
    text = _HOST_PORT.sub("<host>", _URL.sub("<endpoint>", text))
    if isinstance(err, CatimageError):  # our own message already says what went wrong (also through Ray)
        return _clean(text)[:300]
    name = type(err).__name__
    if name.startswith("RayTaskError"):
        name = "GeneratorError"
    return _clean(f"{name}: {text}")[:300]


def replica_died(err: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(err, ActorDiedError | ActorUnavailableError | RayActorError)


def _is_openai_path(request: Request) -> bool:
    return request.url.path.endswith("/v1/images/generations")


def _error(request: Request, status: int, message: str, headers: Mapping[str, str] | None = None,
           extra: dict[str, Any] | None = None) -> JSONResponse:
    """Our error body, `{"detail": ...}`; on the OpenAI path also OpenAI's `{"error": {...}}`, which
    OpenAI clients turn into their exception message."""
    message = _clean(message)
    content: dict[str, Any] = {"detail": message, **(extra or {})}
    if _is_openai_path(request):
        kind = "invalid_request_error" if status < 500 else "server_error"
        content["error"] = {"message": message, "type": kind, "param": None, "code": str(status)}
    return JSONResponse(status_code=status, content=content, headers=dict(headers or {}))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """One readable sentence per problem; malformed JSON is a 400, a well-formed but invalid body a 422."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(request, 400, "the request body is not valid JSON", extra={"errors": _jsonable(errors)})
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (see /docs for the fields this endpoint takes)"
        elif e.get("type") == "string_unicode":
            msg = "not valid Unicode text: it holds a lone surrogate (half of a JSON \\ud83d\\ude00 pair); send UTF-8 text"
        parts.append(f"{where}: {msg}")
    return _error(request, 422, "; ".join(parts), extra={"errors": _jsonable(errors)})


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(request, exc.status_code, str(exc.detail), headers=exc.headers)


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's errors without the echoed input (a 2000-character prompt does not need to come back)."""
    return [
        {"type": str(e.get("type")), "loc": [_clean(str(p)) for p in e.get("loc", ())], "msg": _clean(str(e.get("msg")))}
        for e in errors
    ]


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413 before it is read (Content-Length) or as
    soon as it streams past the limit (chunked)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than {self.max_bytes} bytes; send fewer or shorter prompts"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_json(send, 413, {"detail": message})
                return
        seen = 0
        too_big = False

        async def limited_receive() -> dict:
            nonlocal seen, too_big
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    too_big = True
                    raise _BodyTooLarge(message)
            return msg

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _send_json(send, 413, {"detail": message})


class _BodyTooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
