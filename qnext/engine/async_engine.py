"""AsyncEngine: LLMEngine driven by one background thread, streamed to asyncio callers.

Threads: the engine thread owns the LLMEngine (schedule, forward, sample) and is the only one that touches it
after start. Callers talk to it through an inbox (adds and aborts, lock-protected) that the engine thread drains
at step boundaries; outputs travel back through each caller's asyncio.Queue via call_soon_threadsafe. When
there is nothing to do the thread waits on a Condition (no spinning); the event loop never runs model code.

Admission is decided on the caller's side, synchronously, so that the first `await` of generate() raises
ValueError (400: never fits) or QueueFullError (429) before anything is streamed. The count of live streams
equals the engine's unfinished requests plus the not yet drained inbox, so the engine thread's own
add_request cannot then fail for lack of room.

Failure is fatal: an exception out of a step (or anywhere in the loop) ends the engine thread; every open stream
and every later generate() gets EngineDeadError, and is_alive() turns false (the server's /health then answers
503, so a supervisor restarts the process rather than sending traffic to an engine in an unknown state).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from qnext.engine.scheduler import QueueFullError

log = logging.getLogger("qnext.engine")

__all__ = ["AsyncEngine", "QueueFullError"]


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    # set by the engine thread once its add is applied: outputs of an aborted earlier request with the same
    # id (still in the engine until its abort is drained) never reach this stream
    live: bool = False

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            pass


class EngineDeadError(RuntimeError):
    """The engine loop failed or was shut down; the request cannot continue."""


class AsyncEngine:
    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[tuple] = []                  # ("add", id, prompt, params) | ("abort", id)
        self._streams: dict[str, _Stream] = {}         # live requests: in the inbox or unfinished in the engine
        self._stats = engine.stats()
        self._stopped = False
        self._error: BaseException | None = None       # what killed the engine loop
        self._thread = threading.Thread(target=self._run, name="qnext-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any thread / event loop) --------------------------------------------------
    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def is_alive(self) -> bool:
        """The engine thread runs, has not died of an error and was not shut down."""
        return self._thread.is_alive() and self._error is None and not self._stopped

    @property
    def dead_reason(self) -> str | None:
        """Why the engine is not alive (None while it is)."""
        if self._error is not None:
            return f"the engine loop failed: {type(self._error).__name__}: {self._error}"
        if self._stopped:
            return "the engine is shut down"
        if not self._thread.is_alive():
            return "the engine thread is not running"
        return None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params) -> AsyncIterator:
        """Incremental RequestOutputs of one request, the last with finished=True.

        Raises from the first await: ValueError (can never run), QueueFullError (full), EngineDeadError.
        Leaving the iteration early (break, aclose, task cancelled) aborts the request.
        """
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        if params is None:
            from qnext.sampling_params import SamplingParams
            params = SamplingParams()
        with self._lock:
            if not self.is_alive():
                raise EngineDeadError(self.dead_reason or "the engine is not running")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.engine.check_request(prompt_token_ids, params)
            if len(self._streams) >= self.engine.capacity:
                raise QueueFullError(f"queue full: {len(self._streams)} requests in flight "
                                     f"(max_num_seqs + max_queue = {self.engine.capacity})")
            self._streams[request_id] = stream
            self._inbox.append(("add", request_id, list(prompt_token_ids), params))
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its pages and slot are freed at the engine's next step boundary."""
        with self._lock:
            if self._streams.pop(request_id, None) is not None:
                self._inbox.append(("abort", request_id))
                self._wake.notify()

    def stats(self):
        """EngineStats as of the last step boundary."""
        with self._lock:
            return self._stats

    def shutdown(self, timeout: float | None = 30.0) -> None:
        with self._lock:
            self._stopped = True
            self._wake.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the thread's last word: callers must not wait forever
            log.exception("the engine loop died; failing every request")
            with self._lock:
                self._error = e
            self._fail_all(EngineDeadError(f"the engine loop failed: {type(e).__name__}: {e}"))

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not (self._stopped or self._inbox or engine.has_unfinished_requests()):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                stopped = self._stopped
            if stopped:
                self._fail_all(EngineDeadError("the engine was shut down"))
                return
            for op in inbox:
                self._apply(op)
            outputs = engine.step() if engine.has_unfinished_requests() else []  # raising: see _run
            with self._lock:
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is None or not stream.live:
                        continue  # aborted meanwhile (the abort is in the inbox), or an id reused since
                    if out.finished:
                        del self._streams[out.request_id]
                    stream.put(out)
                self._stats = engine.stats()

    def _apply(self, op: tuple) -> None:
        if op[0] == "abort":
            self.engine.abort_request(op[1])
            return
        _, request_id, prompt, params = op
        try:
            self.engine.add_request(request_id, prompt, params)
        except Exception as e:  # checked on the caller's side already; deliver anything unexpected
            with self._lock:
                stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(e)
            return
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.live = True

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
            self._inbox = []
        try:
            self.engine.abort_all()
        except Exception:  # the engine may be broken; callers are told below either way
            log.exception("aborting requests after a failure failed")
        for stream in streams.values():
            stream.put(error)
        try:
            stats = self.engine.stats()
        except Exception:  # noqa: BLE001 - keep the last good stats
            return
        with self._lock:
            self._stats = stats
