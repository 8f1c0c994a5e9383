"""Server-sent events: `data: {...}\\n\\n` (OpenAI) and `event: NAME\\ndata: {...}\\n\\n` (Anthropic)."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import AsyncIterator, Callable

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
    `yield` (or never started) it would be left for the garbage collector, and its engine requests would keep
    running. Closing it and its generations here (shielded from that cancellation) aborts them at once.
    """

    def __init__(self, content: AsyncIterator[str], on_error: Callable[[Exception], str], gens: list):
        """on_error: the event that reports an APIError raised mid-stream (the status line is already sent).
        gens: the Generations behind the stream, closed at the end even if the stream never started."""
        self._gens = gens
        super().__init__(self._guard(content, on_error), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    async def _guard(content: AsyncIterator[str], on_error) -> AsyncIterator[str]:
        from qnext.server.errors import APIError

        async with aclosing(content):
            try:
                async for chunk in content:
                    yield chunk
            except APIError as e:
                yield on_error(e)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                for g in self._gens:
                    await g.close()
