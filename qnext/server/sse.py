"""Server-sent events: `data: {...}\\n\\n` (OpenAI) and `event: NAME\\ndata: {...}\\n\\n` (Anthropic)."""

from __future__ import annotations

import json

import anyio
from starlette.responses import StreamingResponse


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj) -> str:
    return f"data: {_dumps(obj)}\n\n"


def sse_event(name: str, obj) -> str:
    return f"event: {name}\ndata: {_dumps(obj)}\n\n"


class SSEResponse(StreamingResponse):
    """A stream whose generator is always closed when the response ends, however it ends.

    Starlette cancels the sending task when the client disconnects; if the generator was suspended at a
    `yield` it would be left for the garbage collector, and its engine request would keep running. Closing it
    here (shielded from that cancellation) aborts the engine request at once.
    """

    def __init__(self, content, status_code: int = 200):
        super().__init__(content, status_code=status_code, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
