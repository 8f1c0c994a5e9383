"""Tool schemas and the typing of Qwen3-Coder parameter values (rule 5 in qnext/server/tools.py), plus tool_choice.

Values arrive as text; each is converted with the tool's JSON schema for that parameter. Split from the parser so
that the scanning state machine and the typing rules each read on their own.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

# The call format's tags (exact, case-sensitive) and the whitespace the parser skips.
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
WS = " \t\r\n"



def normalize_tools(tools: list[dict] | None) -> dict[str, dict]:
    """{name: parameters schema} from OpenAI- or Anthropic-style tool dicts (first of a duplicate name wins)."""
    out: dict[str, dict] = {}
    for tool in tools or []:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            continue
        schema = fn.get("parameters", fn.get("input_schema"))
        out.setdefault(name, schema if isinstance(schema, dict) else {})
    return out


def param_schema(tool_schema: dict | None, param: str) -> dict | None:
    if tool_schema is None:
        return None
    props = tool_schema.get("properties")
    if not isinstance(props, dict):
        return None
    sch = props.get(param)
    return sch if isinstance(sch, dict) else None


_TYPE_ALIASES = {
    "integer": "integer", "int": "integer",
    "number": "number", "float": "number", "double": "number", "decimal": "number",
    "boolean": "boolean", "bool": "boolean",
    "object": "object", "dict": "object", "map": "object",
    "array": "array", "list": "array", "tuple": "array",
    "null": "null", "none": "null", "nonetype": "null",
}


def _py_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, dict):
        return "object"
    if isinstance(v, list):
        return "array"
    return "string"


def _resolve_ref(ref: Any, root: Any) -> Any:
    """A local JSON pointer ("#/$defs/Name", "#/definitions/Name", ...) resolved in root, else None."""
    if not isinstance(ref, str) or not ref.startswith("#/") or not isinstance(root, dict):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def schema_types(schema: Any, root: Any = None, depth: int = 0) -> set[str]:
    """Normalised JSON types a schema admits ("string" for unknown names); empty: no type information.
    root: the tool's whole parameters schema, for local "$ref"s (pydantic puts models and enums in $defs)."""
    if not isinstance(schema, dict) or depth > 16:
        return set()
    out: set[str] = set()
    t = schema.get("type")
    for name in [t] if isinstance(t, str) else t if isinstance(t, list) else []:
        if isinstance(name, str):
            out.add(_TYPE_ALIASES.get(name.lower(), "string"))
    if "$ref" in schema:
        out |= schema_types(_resolve_ref(schema["$ref"], root), root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        subs = schema.get(key)
        if isinstance(subs, list):
            for sub in subs:
                out |= schema_types(sub, root, depth + 1)
    enum = schema.get("enum")
    if isinstance(enum, list):
        if not out:
            out |= {_py_type(v) for v in enum}
        elif None in enum:
            out.add("null")
    if not out and "const" in schema:
        out.add(_py_type(schema["const"]))
    if schema.get("nullable") is True:
        out.add("null")
    return out


_NULLISH = re.compile(r"[ \t\r\n]*(?:null|none)[ \t\r\n]*", re.I | re.A)  # unambiguous: linear
_NULL_PREFIXES = frozenset(["", "n", "nu", "nul", "null", "no", "non", "none"])
_NULL_LOWER = {c: c.lower() for c in "nulNULoeOE"}


def null_step(state: tuple[str, bool] | None, c: str) -> tuple[str, bool] | None:
    """One character of the automaton for prefixes of _NULLISH texts: state (letters, trailing-space phase);
    None once no continuation can be null/none."""
    if state is None:
        return None
    letters, trailing = state
    if c in WS:
        if not letters:
            return state
        return (letters, True) if letters in ("null", "none") else None
    low = _NULL_LOWER.get(c)
    if trailing or low is None or letters + low not in _NULL_PREFIXES:
        return None
    return (letters + low, False)


_INT = re.compile(r"[+-]?[0-9]+", re.A)
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.A)
_MISSING = object()
NON_WS = re.compile(r"[^ \t\r\n]")


def _reject_constant(name: str):
    raise ValueError(name)  # NaN / Infinity are not JSON


def parse_container(v: str) -> Any:
    """JSON, then a Python literal; the result normalised to plain JSON types, or _MISSING."""
    try:
        return json.loads(v, parse_constant=_reject_constant)
    except Exception:  # noqa: BLE001 - any failure just means "not JSON"
        pass
    try:
        return json.loads(json.dumps(ast.literal_eval(v), allow_nan=False))
    except Exception:  # noqa: BLE001 - sets, bytes, complex, syntax errors, deep nesting ...
        return _MISSING


def convert_value(value: str, schema: dict | None, root: dict | None = None) -> Any:
    """One parameter's value (newlines already stripped) typed by its JSON schema (rule 5 of the module doc);
    root: the tool's parameters schema, where local "$ref"s point."""
    if schema is None:
        return value
    types = schema_types(schema, root)
    if not types:
        return value
    nullable = "null" in types
    t = types - {"null"}
    if _NULLISH.fullmatch(value) and (nullable or "string" not in t):
        return None
    if t <= {"string"}:
        return value
    v = value.strip(WS)
    if "object" in t or "array" in t:
        r = parse_container(v)
        if (isinstance(r, dict) and "object" in t) or (isinstance(r, list) and "array" in t):
            return r
    if "integer" in t:
        try:
            if _INT.fullmatch(v):
                return int(v)
            if _FLOAT.fullmatch(v):
                f = float(v)
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        except ValueError:  # more digits than int() accepts
            pass
    if "number" in t:
        try:
            if _INT.fullmatch(v):
                return int(v)
            if _FLOAT.fullmatch(v):
                f = float(v)
                if math.isfinite(f):
                    return int(f) if f.is_integer() and abs(f) < 2**53 else f
        except ValueError:
            pass
    if "boolean" in t:
        low = v.lower()
        if low == "true":
            return True
        if low == "false":
            return False
    return value


# --------------------------------------------------------------------------------------------------------
# tool_choice


def validate_tool_choice(tool_choice: Any, tools: list[dict] | None) -> tuple[str, str | None]:
    """Normalise an OpenAI or Anthropic tool_choice to (mode, function name or None).

    mode: "auto" | "none" | "required" | "function". None means "auto". Raises ValueError for an unknown
    value, for "required"/"any" or a named function without tools, and for a name not among the tools.
    """
    names = normalize_tools(tools)
    if hasattr(tool_choice, "model_dump"):  # a pydantic request model
        tool_choice = tool_choice.model_dump(exclude_none=True)
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        mode = {"auto": "auto", "none": "none", "required": "required", "any": "required"}.get(tool_choice)
        if mode is None:
            raise ValueError(f"tool_choice {tool_choice!r} is not one of 'auto', 'none', 'required' "
                             "or a function")
        name = None
    elif isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if kind in ("auto", "none"):
            return kind, None
        if kind == "any":
            mode, name = "required", None
        elif kind in ("function", "tool"):
            fn = tool_choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("tool_choice names no function: expected {\"type\": \"function\", "
                                 "\"function\": {\"name\": ...}} or {\"type\": \"tool\", \"name\": ...}")
            mode = "function"
        else:
            raise ValueError(f"tool_choice type {kind!r} is not one of 'auto', 'none', 'any', 'function', "
                             "'tool'")
    else:
        raise ValueError(f"tool_choice must be a string or an object, not {type(tool_choice).__name__}")
    if mode in ("auto", "none"):
        return mode, None
    if not names:
        raise ValueError(f"tool_choice {mode!r} needs a non-empty tools list")
    if name is not None and name not in names:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                         f"({', '.join(sorted(names))})")
    return mode, name


def forced_tool_prefix(tool_choice: Any, tools: list[dict] | None) -> str:
    """Text forced at the start of the assistant turn; feed it to the parser before the model's text."""
    mode, name = validate_tool_choice(tool_choice, tools)
    if mode == "required":
        return f"{TOOL_CALL_OPEN}\n{FUNCTION_OPEN}"
    if mode == "function":
        return f"{TOOL_CALL_OPEN}\n{FUNCTION_OPEN}{name}>\n"
    return ""
