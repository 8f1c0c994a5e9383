"""The HTTP app: route table, auth and CORS over one Backend. Handlers live in openai_api / anthropic_api."""

from __future__ import annotations

import secrets

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from qnext.server import anthropic_api, convert, openai_api
from qnext.server.errors import bad_request, error_response, install_handlers
from qnext.server.generation import ClientGone
from qnext.server.protocol import DetokenizeRequest, TokenizeRequest
from qnext.server.serving import Backend, ServerConfig

OPEN_PATHS = ("/health", "/metrics")  # answered without an API key (probes and scrapers)


def build_app(async_engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="qnext", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = Backend(async_engine, config)
    install_handlers(app)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, _e: ClientGone):
        return Response(status_code=499)  # nobody reads it; the engine requests are aborted already

    # ---- routes -----------------------------------------------------------------------------------------
    app.include_router(openai_api.router)      # POST /v1/chat/completions, POST /v1/completions
    app.include_router(anthropic_api.router)   # POST /v1/messages, POST /v1/messages/count_tokens
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", model_info, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])

    if config.api_key:
        _require_api_key(app, config.api_key)
    if config.cors_origins:  # added last: outermost, so preflights and 401s carry CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])
    return app


def _require_api_key(app: FastAPI, key: str) -> None:
    """`Authorization: Bearer KEY` (OpenAI clients, ANTHROPIC_AUTH_TOKEN) or `x-api-key: KEY` (Anthropic SDK)."""

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if request.method == "OPTIONS" or request.url.path in OPEN_PATHS:
            return await call_next(request)
        bearer = request.headers.get("authorization", "")
        given = bearer[7:].strip() if bearer[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), key.encode()):
            return error_response(request.url.path, 401, "invalid or missing API key "
                                  "(send Authorization: Bearer KEY or x-api-key: KEY)", code="invalid_api_key")
        return await call_next(request)


def _b(request: Request) -> Backend:
    return request.app.state.backend


def _model_card(b: Backend) -> dict:
    return {"id": b.model_name, "object": "model", "created": 0, "owned_by": "qnext", "max_model_len": b.max_model_len}


async def models(request: Request):
    return {"object": "list", "data": [_model_card(_b(request))]}


async def model_info(model: str, request: Request):
    _b(request).check_model(model)
    return _model_card(_b(request))


async def health(request: Request):
    """200 while the engine loop runs; 503 with an error body once it died or was shut down."""
    engine = _b(request).engine
    if engine.is_alive():
        return {"status": "ok"}
    return error_response(request.url.path, 503, engine.dead_reason or "the engine is not running",
                          code="engine_dead")


async def metrics(request: Request):
    return Response(_b(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def tokenize(body: TokenizeRequest, request: Request):
    """vLLM-style: {prompt} or {messages} (rendered through the chat template) -> token ids."""
    b = _b(request)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    if body.prompt is not None:
        ids = b.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        ids = b.encode(b.render_chat(convert.openai_messages(body.messages), None, body.add_generation_prompt))
    return {"tokens": ids, "count": len(ids), "max_model_len": b.max_model_len}


async def detokenize(body: DetokenizeRequest, request: Request):
    b = _b(request)
    b.check_token_ids(body.tokens, "tokens")
    return JSONResponse({"prompt": b.decode(body.tokens)})
