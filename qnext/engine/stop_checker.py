"""StopChecker: one per generated sequence; turns sampled ids into released text and decides when to stop.

    checker = StopChecker(params, eos_token_ids=tokenizer.eos_token_ids,
                          detokenizer=IncrementalDetokenizer(tokenizer, params.skip_special_tokens),  # None: no text
                          max_tokens=min(params.max_tokens or cap, cap))   # cap = max_model_len - prompt_len
    row.banned_token_ids = checker.suppressed_token_ids()     # before sampling (min_tokens)
    delta_text, delta_ids = checker.update(sampled_ids)       # after sampling; ids past a stop are dropped
    checker.finished / finish_reason / stop_reason / text / token_ids

Order of checks per token: stop token (eos unless ignore_eos, or stop_token_ids) -> "stop"; then stop strings on
the text -> "stop", stop_reason = the string; then max_tokens -> "length". The first `min_tokens` tokens can
never stop the sequence. A stop token's text is not added to the output; a matched stop string and everything
after it are cut. While running, text that could still be the start of a stop string is held back from the
deltas; it is released once it cannot match any more, or when the sequence ends for another reason.
stop_reason is None for eos and length, the token id for stop_token_ids, the string for stop strings.
The text is kept as a list of pieces and only its tail is read per token (stop search, holdback, delta), so a
token costs O(its piece + the longest stop string), not O(text so far); `text` joins the pieces when read.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from qnext.sampling_params import SamplingParams
from qnext.tokenizer import IncrementalDetokenizer


class StopChecker:
    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: Iterable[int] = (),
        detokenizer: IncrementalDetokenizer | None = None,
        max_tokens: int | None = None,
    ):
        if params.stop and detokenizer is None:
            raise ValueError("stop strings need a tokenizer (this request has no detokenizer)")
        limit = params.max_tokens if max_tokens is None else max_tokens
        if limit is None or limit < 1:
            raise ValueError(f"max_tokens must resolve to >= 1, got {limit!r}")
        self.params = params
        self.max_tokens = limit
        self.detokenizer = detokenizer
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self._stop_ids = self.eos_token_ids | self.stop_token_ids
        self._suppress = tuple(sorted(self._stop_ids))
        self.stop_strings = tuple(params.stop)
        self._max_stop_len = max((len(s) for s in self.stop_strings), default=0)
        self.token_ids: list[int] = []
        self._pieces: list[str] = []  # output text so far (stop string cut), joined on demand
        self._len = 0  # len(text)
        self._released = 0  # chars of `text` handed out as deltas
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """Output text so far (a matched stop string and what follows it cut)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def released_text(self) -> str:
        """The text handed out as deltas so far: all of `text` once finished by eos, a stop or length."""
        return self.text if self._released == self._len else self.text[: self._released]

    def _append(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self._len += len(piece)

    def _tail(self, n: int) -> str:
        """The last n characters of text (all of it when shorter)."""
        if n <= 0:
            return ""
        parts, got = [], 0
        for piece in reversed(self._pieces):
            parts.append(piece)
            got += len(piece)
            if got >= n:
                break
        return "".join(reversed(parts))[-n:]

    def suppressed_token_ids(self) -> tuple[int, ...]:
        """Ids the sampler must mask for the next token: the stop ids while fewer than min_tokens are out."""
        return self._suppress if len(self.token_ids) < self.params.min_tokens else ()

    def update(self, new_token_ids: Sequence[int]) -> tuple[str, list[int]]:
        """Consume sampled ids (1, or several with speculative decoding); return (delta_text, accepted ids)."""
        if self.finished:
            return "", []
        accepted: list[int] = []
        for tok in new_token_ids:
            accepted.append(tok)
            self.token_ids.append(tok)
            stoppable = len(self.token_ids) > self.params.min_tokens
            if stoppable and tok in self._stop_ids:
                self._finish("stop", tok if tok in self.stop_token_ids and tok not in self.eos_token_ids else None)
                break
            if self.detokenizer is not None:
                piece = self.detokenizer.add_tokens([tok])
                if piece:
                    old_len = self._len
                    self._append(piece)
                    if stoppable and self.stop_strings and self._check_stop_strings(old_len):
                        break
            if len(self.token_ids) >= self.max_tokens:
                self._finish("length", None)
                break
        return self._take_delta(), accepted

    def abort(self) -> None:
        if not self.finished:
            self.finish_reason = "abort"

    # ---- internals --------------------------------------------------------------------------------
    def _finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        if reason != "stop" or not isinstance(stop_reason, str):
            # Release what the detokenizer still holds (an unfinished character decodes to U+FFFD).
            if self.detokenizer is not None:
                self._append(self.detokenizer.flush())

    def _check_stop_strings(self, old_len: int) -> bool:
        """Search only where a match can end in the new text; cut at the earliest match (ties: list order)."""
        start = max(0, old_len - self._max_stop_len + 1)
        window = self._tail(self._len - start)  # text[start:]
        best: tuple[int, str] | None = None
        for s in self.stop_strings:
            pos = window.find(s)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return False
        cut = self.text[: start + best[0]]
        self._pieces, self._len = [cut] if cut else [], len(cut)
        self._finish("stop", best[1])
        return True

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        tail = self._tail(self._max_stop_len - 1)
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _take_delta(self) -> str:
        end = self._len if self.finished or not self.stop_strings else self._len - self._held_back()
        if end <= self._released:
            return ""
        delta = self._tail(self._len - self._released)[: end - self._released]
        self._released = end
        return delta
