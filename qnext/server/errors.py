"""HTTP errors in the two wire styles, and the handlers that guarantee bad input never becomes a 500.

Routes under /v1/messages answer Anthropic-style bodies; every other route answers OpenAI-style bodies:
  OpenAI:    {"error": {"message", "type", "param", "code"}}
  Anthropic: {"type": "error", "error": {"type", "message"}}
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("qnext.server")

# status -> Anthropic error type (https://docs.anthropic.com/en/api/errors)
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 503: "overloaded_error"}
# status -> OpenAI error type
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client; `param` names the offending request field when known."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def openai_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else status}}


def anthropic_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "invalid_request_error"),
                                       "message": message}}


def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = anthropic_body(status, message) if is_anthropic(path) else openai_body(status, message, param, code)
    return JSONResponse(body, status_code=status, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "json-or-python"}


def _loc_to_param(loc: tuple) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'.

    pydantic also names the union branch it tried ('str', 'list[str]', 'NamedToolChoice', 'function-after[...]');
    request fields are snake_case, so those tags are recognisable and dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part or part[:1].isupper():
            continue
        else:
            out += ("." if out else "") + part
    return out


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(request.url.path, e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = tuple(first.get("loc", ()))
        param = _loc_to_param(loc) or None
        if first.get("type") == "json_invalid":
            msg, param = f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "), None
        elif loc == ("body",):
            msg = "request body must be a JSON object"
        else:
            msg = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
            if len(errs) > 1:
                msg += f" (and {len(errs) - 1} more)"
        return error_response(request.url.path, 400, msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(request.url.path, e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(e).__name__}")
