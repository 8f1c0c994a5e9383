"""Constrained decoding through xgrammar, as per-request logits processors
(`callable(output_token_ids, logits_row) -> logits_row`, see SamplingParams):

- `response_format` json_object / json_schema: every allowed token keeps the output a prefix of valid JSON (of
  the schema); once the value is complete only stop tokens are allowed, so a "stop" finish holds valid JSON
  (a "length" finish may cut it: that is the client's max_tokens).
- tool_choice required: after the forced `<tool_call>\n<function=`, the output must start with one of the
  tools' names and `>\n`; from there on it is free (the call's body is the model's).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Callable

from qnext.server.errors import bad_request

Processor = Callable[[list, Any], Any]


def _vocab_type(tokenizer_json: str):
    """ByteLevel BPE (Qwen's) -> BYTE_LEVEL; SentencePiece byte fallback -> BYTE_FALLBACK; else RAW."""
    import xgrammar as xgr

    try:
        decoder = json.loads(tokenizer_json).get("decoder") or {}
    except json.JSONDecodeError:
        decoder = {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in kinds:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _ebnf_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Grammars:
    """One xgrammar compiler per server (built on first use, in a worker thread); compiled grammars are cached."""

    def __init__(self, vocab: dict[str, int], tokenizer_json: str, vocab_size: int, stop_token_ids: list[int]):
        self._args = (vocab, tokenizer_json, vocab_size, list(stop_token_ids))
        self._compiler = None
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                vocab, tok_json, vocab_size, stops = self._args
                size = max(vocab_size, max(vocab.values(), default=-1) + 1)
                encoded = [""] * size
                for token, idx in vocab.items():
                    encoded[idx] = token
                info = xgr.TokenizerInfo(encoded, _vocab_type(tok_json), vocab_size=size,
                                         stop_token_ids=stops or None)
                self._compiler = xgr.GrammarCompiler(info)
                self._vocab_size = size
            return self._compiler

    def _compile(self, kind: str, schema: dict | None = None, names: tuple[str, ...] = ()):
        compiler = self._get_compiler()
        if kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if kind == "tool_name":
            alts = " | ".join(_ebnf_string(n) for n in names)
            return compiler.compile_grammar(f'root ::= ({alts}) ">\\n"')
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)

    async def tool_name(self, names: list[str]) -> Processor | None:
        """Constrains the output's start to `NAME>\\n` for one of `names`, then lets go; None without xgrammar."""
        try:
            import xgrammar  # noqa: F401
        except ImportError:
            return None
        compiled = await asyncio.to_thread(self._compile, "tool_name", None, tuple(names))
        return _Constrain(compiled, self._vocab_size, release_when_done=True)

    async def processor(self, response_format) -> Processor | None:
        """None for text; else a fresh stateful processor for one engine request (never share it)."""
        if response_format is None or response_format.type == "text":
            return None
        schema = None
        if response_format.type == "json_schema":
            spec = response_format.json_schema or {}
            schema = spec.get("schema", spec.get("json_schema"))
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                                  "response_format.json_schema")
        try:
            import xgrammar  # noqa: F401
        except ImportError:
            raise bad_request("response_format json_object/json_schema needs the xgrammar package on the server",
                              "response_format") from None
        try:
            compiled = await asyncio.to_thread(self._compile, response_format.type, schema)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError variants for bad schemas
            raise bad_request(f"response_format: cannot compile the schema: {e}", "response_format") from None
        return _Constrain(compiled, self._vocab_size)


class _Constrain:
    """release_when_done: once the grammar is complete, stop constraining (else: only stop tokens remain)."""

    def __init__(self, compiled, vocab_size: int, release_when_done: bool = False):
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=release_when_done)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._seen = 0          # output tokens already fed to the matcher
        self._broken = False    # a token the grammar rejected got through (should not happen): stop constraining

    def __call__(self, output_token_ids: list, logits):
        if len(output_token_ids) < self._seen:  # the engine restarted the request: replay from scratch
            self._matcher.reset()
            self._seen, self._broken = 0, False
        for tok in output_token_ids[self._seen:]:
            if not self._broken and not self._matcher.is_terminated():
                self._broken = not self._matcher.accept_token(int(tok))
        self._seen = len(output_token_ids)
        if self._broken or self._matcher.is_terminated():  # terminated: released (or only a stop came next)
            return logits
        self._matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.unsqueeze(0)  # a view: masked in place
        self._xgr.apply_token_bitmask_inplace(row, self._bitmask.to(logits.device, non_blocking=True))
        return logits
