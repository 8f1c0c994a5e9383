"""`qnext serve`: load the model, then answer the OpenAI and Anthropic APIs over HTTP (uvicorn)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qnext.commands.engine_args import add_engine_args, build_engine


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (default: qnext's bundled default model)")
    p.add_argument("--synthetic", action="store_true",
                   help="random weights made on the device instead of the checkpoint's (speed tests at full size "
                        "without weights on disk); --model is then a directory with config.json and a tokenizer, "
                        "e.g. from `qnext synth --preset qwen3-coder-next --config-only`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="model name in /v1/models and responses (default: the checkpoint directory's name)")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY or x-api-key: KEY) on every route but "
                        "/health and /metrics")
    p.add_argument("--cors-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="allow browser requests from these origins ('*' for any)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(p)


def run(args: argparse.Namespace) -> int:
    if args.model is None:
        from qnext.default_model import default_model_path
        args.model = str(default_model_path())
    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.synthetic and not (Path(args.model) / "tokenizer.json").is_file():
        raise ValueError(f"--synthetic serving needs a directory with config.json and tokenizer.json as --model "
                         f"(qnext synth --preset NAME --config-only --out DIR makes one); {args.model} has none")
    import uvicorn

    from qnext.engine.async_engine import AsyncEngine
    from qnext.server.app import build_app
    from qnext.server.serving import ServerConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(served_model_name=args.served_model_name or Path(args.model).resolve().name,
                          model_path=str(args.model), api_key=args.api_key, cors_origins=tuple(args.cors_origins))
    # build_engine: the weights' loading bar; the engine logs its device, dtype and cache sizes once
    engine = AsyncEngine(build_engine(args, synthetic=args.synthetic))
    try:
        app = build_app(engine, config)
        logging.getLogger("qnext.server").info("serving %s as %r on http://%s:%d", args.model,
                                               config.served_model_name, args.host, args.port)
        # access_log off: each request already gets one line (id, tokens, TTFT, tokens/s) from the server
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                    timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 0
