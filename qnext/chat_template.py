"""ChatTemplate: the checkpoint's own Jinja chat template, rendered the way HF `apply_chat_template` does.

Source, first found wins: `chat_template.jinja` (plus `additional_chat_templates/*.jinja` as named
templates), else tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"}).
With several named templates, "tool_use" is used when tools are given and present, else "default".

Environment as HF: jinja2 ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks, loopcontrols),
a `tojson` filter that does not HTML-escape, globals `raise_exception` and `strftime_now`, and a no-op
`{% generation %}` block. The tokenizer's special token strings (bos_token, eos_token, ...) are passed
as variables; caller kwargs override them. Every template failure surfaces as ChatTemplateError (ValueError).
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """No template, a template that does not compile, or one that fails (or raise_exception()s) on render."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def normalize_messages(messages: list[dict]) -> list[dict]:
    """A deep copy with assistant tool_calls' JSON-string arguments parsed to dicts.

    Qwen templates iterate `tool_call.arguments | items`; OpenAI clients send arguments as a JSON string.
    Strings that are not a JSON object are left as they are. Content lists pass through unchanged (as HF).
    """
    out = copy.deepcopy(list(messages))
    for msg in out:
        if not isinstance(msg, dict):
            raise ChatTemplateError(f"each message must be a mapping, got {type(msg).__name__}")
        for call in msg.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            fn = call.get("function") if isinstance(call.get("function"), dict) else call
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    parsed = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, dict):
                    fn["arguments"] = parsed
    return out


class ChatTemplate:
    def __init__(self, templates: str | dict[str, str], special_tokens: dict[str, str] | None = None):
        """`templates`: one template source, or name -> source. `special_tokens`: e.g. {"eos_token": "<|im_end|>"}."""
        if isinstance(templates, str):
            templates = {"default": templates}
        if not templates:
            raise ChatTemplateError("no chat template given")
        self.sources = dict(templates)
        self.special_tokens = dict(special_tokens or {})
        env = _environment()
        self._compiled: dict[str, jinja2.Template] = {}
        for name, src in self.sources.items():
            try:
                self._compiled[name] = env.from_string(src)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"chat template {name!r} does not compile (line {e.lineno}): {e.message}") from e

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> "ChatTemplate":
        root = Path(checkpoint_dir)
        config = _read_json(root / "tokenizer_config.json")
        special = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = config.get(name)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                special[name] = v
        templates: dict[str, str] = {}
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            templates["default"] = jinja_file.read_text(encoding="utf-8")
            extra = root / "additional_chat_templates"
            if extra.is_dir():
                for f in sorted(extra.glob("*.jinja")):
                    templates[f.stem] = f.read_text(encoding="utf-8")
        else:
            t = config.get("chat_template")
            if isinstance(t, str):
                templates["default"] = t
            elif isinstance(t, list):
                for item in t:
                    if isinstance(item, dict) and isinstance(item.get("template"), str):
                        templates[str(item.get("name", "default"))] = item["template"]
        if not templates:
            raise ChatTemplateError(
                f"no chat template in {root} (looked for chat_template.jinja and tokenizer_config.json's "
                f"'chat_template'); use plain prompts or prompt_token_ids"
            )
        return cls(templates, special)

    def pick(self, tools: list | None) -> str:
        if tools and "tool_use" in self.sources:
            return "tool_use"
        if "default" in self.sources:
            return "default"
        if len(self.sources) == 1:
            return next(iter(self.sources))
        raise ChatTemplateError(f"no 'default' chat template among {sorted(self.sources)}")

    def render(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for `messages` (OpenAI-style dicts). kwargs reach the template (e.g. enable_thinking)."""
        name = self.pick(tools)
        variables = {
            **self.special_tokens,
            **kwargs,
            "messages": normalize_messages(messages),
            "tools": list(tools) if tools else None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._compiled[name].render(**variables)
        except jinja2.TemplateError as e:  # includes raise_exception() and sandbox SecurityError
            raise ChatTemplateError(f"chat template {name!r} failed: {e}") from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(f"chat template {name!r} failed: {type(e).__name__}: {e}") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))
