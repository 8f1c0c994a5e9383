"""Qwen3-Coder tool-call parsing (qnext/server/tools.py): rules, typing, streaming == whole text, fuzz, cost."""

from __future__ import annotations

import json
import random
import time

import pytest

from qnext.server.tools import (
    StreamingToolParser,
    ToolCall,
    convert_value,
    forced_tool_prefix,
    normalize_tools,
    parse_tool_calls,
    validate_tool_choice,
)

# ---------------------------------------------------------------------------------------------------------
# fixtures and helpers


def _fn(name, props, **extra):
    return {"type": "function", "function": {"name": name, "description": "d",
                                             "parameters": {"type": "object", "properties": props, **extra}}}


TOOLS = [
    _fn("read", {"path": {"type": "string"}, "limit": {"type": "integer"}, "offset": {"type": "number"}}),
    _fn("write", {"path": {"type": "string"}, "content": {"type": "string"}}),
    _fn("edit", {"path": {"type": "string"}, "replace_all": {"type": "boolean"},
                 "edits": {"type": "array", "items": {"type": "object"}}, "meta": {"type": "object"},
                 "note": {"type": ["string", "null"]}, "count": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                 "paths": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
                 "mode": {"enum": ["fast", "slow"]}, "level": {"enum": [1, 2, 3]}}),
    {"name": "Bash", "description": "Anthropic style", "input_schema": {
        "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}}}},
]


def call_text(name, params, wrapped=True):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    inner = f"<function={name}>\n{body}</function>\n"
    return f"<tool_call>\n{inner}</tool_call>" if wrapped else inner + "</tool_call>"


def stream(text, tools, sizes=None, rng=None):
    """Feed text in chunks (sizes: list of chunk sizes, or random when rng), check event well-formedness and
    return (content or None, [(name, arguments_json)], events)."""
    p = StreamingToolParser(tools)
    events, i = [], 0
    while i < len(text):
        n = sizes.pop(0) if sizes else (rng.randint(1, 8) if rng else len(text))
        events += p.feed(text[i:i + n])
        i += n
    events += p.finish()
    content, args, open_call, names = [], {}, None, {}
    for ev in events:
        if ev.kind == "text":
            assert open_call is None and ev.text
            content.append(ev.text)
        elif ev.kind == "call":
            assert open_call is None and ev.index == len(names) and ev.id.startswith("call_")
            open_call, names[ev.index], args[ev.index] = ev.index, ev.name, []
        elif ev.kind == "args":
            assert ev.index == open_call and ev.text
            args[ev.index].append(ev.text)
        else:
            assert ev.kind == "end" and ev.index == open_call
            c = ev.call
            assert c is p.tool_calls[ev.index] and c.name == names[ev.index] and c.id == ev.id
            assert "".join(args[ev.index]) == c.arguments_json  # the streamed JSON is the final JSON
            assert c.arguments_json == json.dumps(c.arguments, ensure_ascii=False)
            assert json.loads(c.arguments_json) == c.arguments
            open_call = None
    assert open_call is None
    content = "".join(content) or None
    assert content == p.content
    return content, [(c.name, c.arguments_json) for c in p.tool_calls], events


def parse(text, tools=TOOLS):
    content, calls = parse_tool_calls(text, tools)
    return content, [(c.name, c.arguments) for c in calls]


def check_all_splits(text, tools=TOOLS):
    """Streaming == whole text for: whole, char by char, every split into two, and random chunkings."""
    content, calls = parse_tool_calls(text, tools)
    ref = (content, [(c.name, c.arguments_json) for c in calls])
    assert stream(text, tools)[:2] == ref
    assert stream(text, tools, [1] * len(text))[:2] == ref
    for k in range(1, len(text)):
        assert stream(text, tools, [k, len(text)])[:2] == ref, k
    rng = random.Random(len(text))
    for _ in range(5):
        assert stream(text, tools, rng=rng)[:2] == ref
    return ref


# ---------------------------------------------------------------------------------------------------------
# the format


def test_single_call_with_content():
    text = "I'll read it.\n\n" + call_text("read", [("path", "/a/b.py"), ("limit", "20")])
    assert parse(text) == ("I'll read it.", [("read", {"path": "/a/b.py", "limit": 20})])


def test_no_call_is_plain_content():
    assert parse("Hello\nworld\n") == ("Hello\nworld\n", [])
    assert parse("") == (None, [])
    assert parse("  \n") == ("  \n", [])


def test_several_calls_and_text_between():
    text = ("Plan:\n" + call_text("read", [("path", "a")]) + "\n" + call_text("read", [("path", "b")])
            + "\nThen more.\n" + call_text("write", [("path", "c"), ("content", "x")]) + "\n")
    content, calls = parse(text)
    assert content == "Plan:\nThen more."
    assert calls == [("read", {"path": "a"}), ("read", {"path": "b"}), ("write", {"path": "c", "content": "x"})]


def test_call_only_content_is_none():
    assert parse("\n" + call_text("read", [("path", "a")]) + "\n\n")[0] is None


def test_whitespace_variations():
    text = "<tool_call>  \n\n<function= read >\n\n<parameter= path >\nx\n</parameter>\n\n</function>\n\n</tool_call>"
    assert parse(text) == (None, [("read", {"path": "x"})])
    # no newlines at all
    assert parse("<tool_call><function=read><parameter=path>x</parameter></function></tool_call>") == \
        (None, [("read", {"path": "x"})])
    # \r\n line ends
    text = "<tool_call>\r\n<function=read>\r\n<parameter=path>\r\nx\r\n</parameter>\r\n</function>\r\n</tool_call>"
    assert parse(text) == (None, [("read", {"path": "x"})])


def test_call_without_parameters():
    assert parse("<tool_call>\n<function=read>\n</function>\n</tool_call>") == (None, [("read", {})])


def test_json_body_fallback():
    text = '<tool_call>\n<function=read>\n{"path": "a", "limit": 3}\n</function>\n</tool_call>'
    assert parse(text) == (None, [("read", {"path": "a", "limit": 3})])
    assert parse("<tool_call>\n<function=read>\nnot json\n</function>\n</tool_call>") == (None, [("read", {})])


def test_newline_stripping_is_one_each():
    def val(v):
        text = f"<tool_call>\n<function=write>\n<parameter=content>{v}</parameter>\n</function>\n</tool_call>"
        return parse(text)[1][0][1]["content"]
    assert val("\nabc\n") == "abc"
    assert val("\n\nabc\n\n") == "\nabc\n"
    assert val("abc") == "abc"
    assert val("\n\n") == ""
    assert val("\n") == ""
    assert val("") == ""
    assert val("\r\nabc\r\n") == "abc"
    assert val("\n  indented\n    code\n") == "  indented\n    code"
    assert val("\nabc \n") == "abc "
    assert val("\nabc\r") == "abc\r"


def test_missing_parameter_close():
    text = "<tool_call>\n<function=read>\n<parameter=path>\n/x\n<parameter=limit>\n5\n</function>\n</tool_call>"
    assert parse(text) == (None, [("read", {"path": "/x", "limit": 5})])


def test_duplicate_parameter_keeps_first():
    text = call_text("read", [("path", "a"), ("path", "b"), ("limit", "1")])
    assert parse(text) == (None, [("read", {"path": "a", "limit": 1})])
    check_all_splits(text)


def test_text_between_parameters_goes_to_the_value():
    text = ("<tool_call>\n<function=read>\n<parameter=path>\na\n</parameter>\njunk\n"
            "<parameter=limit>\n1\n</parameter>\n</function>\n</tool_call>")
    assert parse(text)[1] == [("read", {"path": "a\n</parameter>\njunk", "limit": 1})]


# ---------------------------------------------------------------------------------------------------------
# tag-like text inside values


def test_tags_inside_values():
    code = ('def f():\n    s = "</parameter>"\n    t = "<parameter=x>"\n    u = "<function=g>" + "</function>"\n'
            '    return "<tool_call>" + "</tool_call>"\n')
    text = call_text("write", [("path", "p.py"), ("content", code)])
    assert parse(text) == (None, [("write", {"path": "p.py", "content": code})])
    check_all_splits(text)


def test_value_ending_with_parameter_close_text():
    text = call_text("write", [("content", "a</parameter>")])
    assert parse(text)[1] == [("write", {"content": "a</parameter>"})]


def test_function_close_inside_value_then_more_parameters():
    value = "x</function>\nmore text"
    text = call_text("write", [("content", value), ("path", "p")])
    assert parse(text) == (None, [("write", {"content": value, "path": "p"})])
    check_all_splits(text)


def test_line_start_parameter_tag_splits_a_value():
    # Documented limit: a line starting with <parameter=NAME> inside a value starts a new parameter.
    text = call_text("write", [("content", "a\n<parameter=path>\nb")])
    assert parse(text)[1] == [("write", {"content": "a", "path": "b"})]


def test_structural_marker_after_function_close_in_value_closes_the_call():
    # Documented limit: after a `</function>` in a value, a line starting with <tool_call> ends the call.
    text = call_text("write", [("content", "a</function>\n<tool_call>\nb")])
    content, calls = parse(text)
    assert calls == [("write", {"content": "a"})] and content.startswith("\n<tool_call>\nb")


def test_last_function_close_before_tool_call_close():
    text = ("<tool_call>\n<function=write>\n<parameter=content>\n</function>\n</function>\n</parameter>\n"
            "</function>\n</tool_call>after")
    assert parse(text) == ("after", [("write", {"content": "</function>\n</function>"})])
    check_all_splits(text)


def test_junk_after_function_inside_wrapper_is_dropped():
    text = "<tool_call>\n<function=read>\n<parameter=path>\na\n</parameter>\n</function>\njunk\n</tool_call>"
    assert parse(text) == (None, [("read", {"path": "a"})])


# ---------------------------------------------------------------------------------------------------------
# robustness: missing tags, truncation, unknown tools


def test_missing_opening_tool_call():
    text = "I'll glob.\n\n<function=read>\n<parameter=path>\n*.md\n</parameter>\n</function>\n</tool_call>"
    assert parse(text) == ("I'll glob.", [("read", {"path": "*.md"})])
    assert parse("<function=read>\n<parameter=path>\nx\n</parameter>\n</function>") == \
        (None, [("read", {"path": "x"})])
    check_all_splits(text)


def test_bare_function_must_start_a_line_and_name_a_known_tool():
    text = "see <function=read> here"
    assert parse(text) == (text, [])
    text = "<function=nosuch>\n<parameter=a>\n1\n</parameter>\n</function>"
    assert parse(text) == (text, [])
    # without tools any name is accepted
    assert parse(text, None) == (None, [("nosuch", {"a": "1"})])


def test_two_bare_calls_and_mixed():
    text = ("<function=read>\n<parameter=path>\na\n</parameter>\n</function>\n"
            "<function=read>\n<parameter=path>\nb\n</parameter>\n</function>\n</tool_call>")
    assert parse(text) == (None, [("read", {"path": "a"}), ("read", {"path": "b"})])
    text = ("<tool_call>\n<function=read>\n<parameter=path>\na\n</parameter>\n</function>\n"
            "<tool_call>\n<function=read>\n<parameter=path>\nb\n</parameter>\n</function>\n</tool_call>")
    assert parse(text) == (None, [("read", {"path": "a"}), ("read", {"path": "b"})])


def test_missing_closing_tags():
    base = "<tool_call>\n<function=read>\n<parameter=path>\na\n</parameter>\n<parameter=limit>\n3\n"
    expect = (None, [("read", {"path": "a", "limit": 3})])
    assert parse(base) == expect
    assert parse(base + "</parameter>\n") == expect
    assert parse(base + "</parameter>\n</function>") == expect
    assert parse(base + "</parameter>\n</function>\n") == expect
    assert parse(base + "</parameter>\n</tool_call>") == expect  # no </function>
    assert parse(base + "</parameter>\n</function>\nDone.") == ("\nDone.", expect[1])


def test_truncated_output_never_raises_and_degrades():
    full = "Let me look.\n" + call_text("edit", [("path", "a.py"), ("replace_all", "true"),
                                                  ("edits", '[{"old": "x", "new": "y"}]'), ("count", "2")])
    for k in range(len(full) + 1):
        content, calls = parse_tool_calls(full[:k], TOOLS)
        if content is not None:
            assert "<tool_call>" not in content or k < full.index("<tool_call>") + 30
        for c in calls:
            assert c.name == "edit" and json.loads(c.arguments_json) == c.arguments


def test_truncated_opener_is_content():
    assert parse("Hi <tool_call>") == ("Hi <tool_call>", [])
    assert parse("Hi\n<tool_call>\n<function=rea") == ("Hi\n<tool_call>\n<function=rea", [])
    assert parse("<tool_call>\n<function=read>") == (None, [("read", {})])
    assert parse("<tool_call>\n<function=read>\n<parameter=pa") == (None, [("read", {})])
    assert parse("<tool_call>\n<function=read>\n<parameter=path>\n/a/b") == (None, [("read", {"path": "/a/b"})])


def test_opener_gap_is_bounded():
    assert parse("<tool_call>" + "\n" * 64 + "<function=read>\n</function>") == (None, [("read", {})])
    text = "<tool_call>" + "\n" * 65 + "<function=read>\n</function>"
    assert parse(text) == ("<tool_call>", [("read", {})])  # not a wrapper; the bare opener still counts
    check_all_splits("a<tool_call>" + " " * 70 + "b")


def test_prose_mentioning_tags_stays_content():
    for text in ["Use the <tool_call> tag to call tools.", "A `<tool_call>` then text",
                 "<tool_call>\nnot a function\n</tool_call>", "x <function=read> y", "</tool_call> stray",
                 "<tool_call>\n<function=bad name\n>", "<tool_call><function=>"]:
        assert parse(text) == (text, []), text


def test_unknown_tool_in_wrapper_is_kept_untyped():
    text = call_text("nosuch", [("n", "5"), ("obj", '{"a": 1}')])
    assert parse(text) == (None, [("nosuch", {"n": "5", "obj": '{"a": 1}'})])


def test_forced_prefix_then_model_text():
    prefix = forced_tool_prefix("required", TOOLS)
    assert parse(prefix + "read>\n<parameter=path>\nx\n</parameter>\n</function>\n</tool_call>") == \
        (None, [("read", {"path": "x"})])
    prefix = forced_tool_prefix({"type": "function", "function": {"name": "read"}}, TOOLS)
    assert parse(prefix + "<parameter=limit>\n7\n</parameter>\n</function>\n</tool_call>") == \
        (None, [("read", {"limit": 7})])


# ---------------------------------------------------------------------------------------------------------
# typing


def edit_args(**params):
    return parse(call_text("edit", list(params.items())))[1][0][1]


def test_typing_scalars():
    assert parse(call_text("read", [("limit", "12"), ("offset", "2.5")]))[1][0][1] == {"limit": 12, "offset": 2.5}
    assert parse(call_text("read", [("offset", "3.0")]))[1][0][1] == {"offset": 3}
    assert parse(call_text("read", [("offset", "7")]))[1][0][1] == {"offset": 7}
    assert parse(call_text("read", [("limit", "4.0")]))[1][0][1] == {"limit": 4}
    assert parse(call_text("read", [("limit", "many")]))[1][0][1] == {"limit": "many"}
    assert parse(call_text("read", [("offset", "nan")]))[1][0][1] == {"offset": "nan"}
    assert parse(call_text("read", [("path", "007")]))[1][0][1] == {"path": "007"}
    assert edit_args(replace_all="true") == {"replace_all": True}
    assert edit_args(replace_all="False") == {"replace_all": False}
    assert edit_args(replace_all="yes") == {"replace_all": "yes"}
    assert parse(call_text("read", [("undeclared", "5")]))[1][0][1] == {"undeclared": "5"}


def test_typing_containers():
    assert edit_args(edits='[{"old": "a", "new": "b"}]') == {"edits": [{"old": "a", "new": "b"}]}
    assert edit_args(edits="[{'old': 'a', 'new': None, 'x': True}]") == \
        {"edits": [{"old": "a", "new": None, "x": True}]}
    assert edit_args(meta='{"k": 1}') == {"meta": {"k": 1}}
    assert edit_args(meta="[1, 2]") == {"meta": "[1, 2]"}  # wrong container kind: raw
    assert edit_args(meta="{broken") == {"meta": "{broken"}
    assert edit_args(meta="{1, 2}") == {"meta": "{1, 2}"}  # a Python set is not JSON
    assert edit_args(paths='["a", "b"]') == {"paths": ["a", "b"]}
    assert edit_args(paths="just/one") == {"paths": "just/one"}


def test_typing_null_and_enum():
    assert edit_args(note="null") == {"note": None}
    assert edit_args(note="None") == {"note": None}
    assert edit_args(note="nonexistent") == {"note": "nonexistent"}
    assert edit_args(count="NULL") == {"count": None}
    assert edit_args(count="3") == {"count": 3}
    assert parse(call_text("write", [("content", "null")]))[1][0][1] == {"content": "null"}  # string: kept
    assert edit_args(meta="null") == {"meta": None}  # no string type: null can only mean null
    assert edit_args(mode="fast") == {"mode": "fast"}
    assert edit_args(level="2") == {"level": 2}


@pytest.mark.parametrize("value,schema,expected", [
    ("5", {"type": "integer"}, 5),
    ("-5", {"type": "int"}, -5),
    ("5", {"type": "string"}, "5"),
    ("5", None, "5"),
    ("5", {}, "5"),
    ("5", {"description": "no type"}, "5"),
    ("1e3", {"type": "number"}, 1000),
    ("0.1", {"type": "number"}, 0.1),
    ("12345678901234567890", {"type": "number"}, 12345678901234567890),
    ("1e400", {"type": "number"}, "1e400"),
    ("1_000", {"type": "integer"}, "1_000"),
    (" 42 ", {"type": "integer"}, 42),
    ("9" * 5000, {"type": "integer"}, "9" * 5000),
    ("TRUE", {"type": "boolean"}, True),
    ("true", {"type": ["boolean", "string"]}, True),
    ("maybe", {"type": ["boolean", "string"]}, "maybe"),
    ("null", {"type": "string", "nullable": True}, None),
    ("null", {"type": ["string", "null"]}, None),
    ("null", {"oneOf": [{"type": "string"}, {"type": "null"}]}, None),
    ("null", {"type": "integer"}, None),
    ("x", {"type": "null"}, "x"),
    ("(1, 2)", {"type": "array"}, [1, 2]),
    ("{'a': (1,)}", {"type": "object"}, {"a": [1]}),
    ("[1, NaN]", {"type": "array"}, "[1, NaN]"),
    ("[" * 10000, {"type": "array"}, "[" * 10000),
    ('{"a": 1}', {"type": "date-time"}, '{"a": 1}'),
    ("b", {"enum": ["a", "b", None]}, "b"),
    ("null", {"enum": ["a", None]}, None),
    ("true", {"const": True}, True),
    ("3", {"allOf": [{"type": "integer"}]}, 3),
])
def test_convert_value(value, schema, expected):
    got = convert_value(value, schema)
    assert got == expected and type(got) is type(expected)


def test_local_refs_are_resolved():
    # pydantic-style: models and enums in $defs, Optional[...] as anyOf with null
    params = {"type": "object", "$defs": {"Opts": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                          "Mode": {"enum": ["a", "b"], "type": "string"},
                                          "N": {"type": "integer"}},
              "properties": {"opts": {"anyOf": [{"$ref": "#/$defs/Opts"}, {"type": "null"}]},
                             "mode": {"$ref": "#/$defs/Mode"}, "n": {"$ref": "#/$defs/N"},
                             "bad": {"$ref": "#/$defs/Missing"}, "ext": {"$ref": "http://x/y.json"}}}
    tools = [{"type": "function", "function": {"name": "t", "parameters": params}}]
    text = call_text("t", [("opts", '{"x": 1}'), ("mode", "a"), ("n", "4"), ("bad", "5"), ("ext", "6")])
    assert parse(text, tools) == (None, [("t", {"opts": {"x": 1}, "mode": "a", "n": 4, "bad": "5", "ext": "6"})])
    assert parse(call_text("t", [("opts", "null")]), tools)[1] == [("t", {"opts": None})]
    loop = {"$defs": {"A": {"$ref": "#/$defs/A"}}, "properties": {"a": {"$ref": "#/$defs/A"}}}
    assert convert_value("1", loop["properties"]["a"], loop) == "1"


def test_anthropic_tools_and_normalize():
    text = call_text("Bash", [("command", "ls -la"), ("timeout", "30")])
    assert parse(text) == (None, [("Bash", {"command": "ls -la", "timeout": 30})])
    schemas = normalize_tools(TOOLS + [{"name": "web_search", "type": "web_search_20250305"}, "junk", {}, None])
    assert list(schemas) == ["read", "write", "edit", "Bash", "web_search"] and schemas["web_search"] == {}


# ---------------------------------------------------------------------------------------------------------
# streaming


REPRESENTATIVE = [
    "Hello, world!\n",
    "I'll read.\n\n" + call_text("read", [("path", "/a/b.py"), ("limit", "10"), ("offset", "1.5")]) + "\n",
    call_text("edit", [("path", "x"), ("edits", '[{"a": 1}]'), ("note", "null"), ("note", "dup"),
                       ("replace_all", "true"), ("count", "none"), ("paths", "p")]),
    call_text("write", [("content", "a</parameter>b\n</function>\nc <parameter=x> d\n  <tool_call>\r\n")]),
    "pre\n<function=read>\n<parameter=path>\nx\n</parameter>\n</function>\n</tool_call>\npost",
    "<tool_call>\n<function=read>\n<parameter=path>\ntrunc",
    "a <tool_call> b\n<function=nosuch>\nc </tool_call>\n<tool_call>\n<function=unknown_tool>\n<parameter=q>\n1\n",
    "<tool_call>\n<function=write>\n<parameter=content>\nx\n</function>\n<tool_call>\n<function=read>\n</function>",
    "é😀\n<tool_call>\n<function=write>\n<parameter=content>\n\"quoted\" \\ tab\t 😀\n</parameter>\n"
    "</function>\n</tool_call>",
    "<tool_call>\n<function=read>\n{\"path\": \"j\"}\n</function>\n</tool_call>",
]


@pytest.mark.parametrize("text", REPRESENTATIVE)
def test_streaming_equals_whole_text_at_every_split(text):
    check_all_splits(text)


def test_string_arguments_stream_before_the_value_closes():
    body = "line one\nline two\n" * 20
    text = call_text("write", [("path", "f.txt"), ("content", body)])
    cut = text.index("</parameter>", text.index("<parameter=content>"))
    p = StreamingToolParser(TOOLS)
    got = "".join(e.text for e in p.feed(text[:cut]) if e.kind == "args")
    # everything but the held newline (the one before </parameter>) is already out, escaped, after the key
    assert got == '{"path": "f.txt", "content": "' + json.dumps(body)[1:-1]
    rest = "".join(e.text for e in p.feed(text[cut:]) + p.finish() if e.kind == "args")
    assert got + rest == p.tool_calls[0].arguments_json


def test_typed_argument_is_written_when_its_parameter_closes():
    p = StreamingToolParser(TOOLS)
    text = "<tool_call>\n<function=read>\n<parameter=limit>\n12\n</parameter>\n<parameter=path>\n"
    got = "".join(e.text for e in p.feed(text) if e.kind == "args")
    assert got == '{"limit": 12, "path": "'


def test_nullable_string_waits_until_it_cannot_be_null():
    p = StreamingToolParser(TOOLS)
    pre = "<tool_call>\n<function=edit>\n<parameter=note>\n"
    assert "".join(e.text for e in p.feed(pre + "nu") if e.kind == "args") == '{"note": '
    assert "".join(e.text for e in p.feed("t") if e.kind == "args") == '"nut'


def test_content_holds_back_only_the_ambiguous_suffix():
    p = StreamingToolParser(TOOLS)
    out = []
    for ch in "ab<tc x\n<tool":
        out.append("".join(e.text for e in p.feed(ch)))
    assert out == ["a", "b", "", "", "<tc", "", " x", "", "", "", "", "", ""]
    assert [e.kind for e in p.feed("_call>\n<function=read>")] == ["call"]
    assert [e.kind for e in p.finish()] == ["args", "end"]
    assert p.content == "ab<tc x"


def test_prose_tool_call_tag_is_released_once_it_cannot_open_a_call():
    p = StreamingToolParser(TOOLS)
    assert "".join(e.text for e in p.feed("The <tool_call>")) == "The"
    assert "".join(e.text for e in p.feed(" tag")) == " <tool_call> tag"


def test_call_event_carries_the_name_as_soon_as_it_is_complete():
    p = StreamingToolParser(TOOLS)
    assert p.feed("<tool_call>\n<function=rea") == []
    evs = p.feed("d>")
    assert [(e.kind, e.name, e.index) for e in evs] == [("call", "read", 0)]


# ---------------------------------------------------------------------------------------------------------
# fuzz: no exception on any input, streaming == whole text, JSON always valid

_PIECES = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>",
           "<tool_call>\n<function=read>\n", "<function=write>\n", "<parameter=path>", "<parameter=limit>\n",
           "<parameter=content>\n", "<parameter=note>\n", "<parameter=edits>\n", "read>", "edit>", "nosuch>",
           ">", "<", "</", "=", "\n", "\n", "\n", "\r", "\r\n", " ", "  ", "\t", "x", "hello", "null", "None",
           "12", "-3.5", "true", "[1, 2]", "{\"a\": 1}", "{'b': 2}", "\"", "\\", "é", "😀", "</param", "<tool",
           "</func", "<func", "tion>", "call>"]


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 30)))


def test_fuzz_streaming_equals_whole_text():
    rng = random.Random(1234)
    tools_options = [TOOLS, None, []]
    for n in range(600):
        text = _random_text(rng)
        tools = tools_options[n % 3]
        content, calls = parse_tool_calls(text, tools)
        ref = (content, [(c.name, c.arguments_json) for c in calls])
        assert stream(text, tools, rng=rng)[:2] == ref, text
        if n % 4 == 0:
            assert stream(text, tools, [1] * len(text))[:2] == ref, text


def test_fuzz_any_characters_never_raise():
    rng = random.Random(99)
    alphabet = "<>/=\n\r\t _abcfinoptuxlr\"\\{}[]0129" + "\ud800\x00\u2028é"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        content, calls = parse_tool_calls(text, TOOLS)
        assert stream(text, TOOLS, rng=rng)[:2] == (content, [(c.name, c.arguments_json) for c in calls])


def _ambiguous(values: list[str]) -> bool:
    """Can the rules (3 and 4) not carry these values through `<parameter=k>\\nV\\n</parameter>`?"""
    if any(line.startswith("<parameter=") for v in values for line in v.split("\n")):
        return True
    if any(v.endswith("\r") for v in values):  # "\r" + the separating "\n" strip as one newline
        return True
    body = "".join(f"<parameter=k>\n{v}\n</parameter>\n" for v in values)
    if any(line.startswith("</tool_call>") for line in body.split("\n")):
        return True
    if "</function>" not in body:
        return False
    markers = ("</tool_call>", "<tool_call>", "<function=")
    after = body[body.index("</function>"):]
    if any(line.startswith(markers) for line in after.split("\n")[1:]):
        return True
    return any(part.lstrip(" \t\r\n").startswith(markers) for part in body.split("</function>")[1:])


def test_round_trip_random_string_values():
    rng = random.Random(7)
    alphabet = ["a", "b", " ", "\n", "\n", "\r\n", "\t", "<", ">", "/", "=", "</parameter>", "<parameter=x>",
                "</function>", "<function=y>", "</tool_call>", "<tool_call>", "null", "\"", "\\", "😀"]
    done = 0
    while done < 300:
        values = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(2)]
        if _ambiguous(values):
            continue
        done += 1
        text = "Sure.\n" + call_text("write", [("path", values[0]), ("content", values[1])]) + "\n"
        assert parse(text) == ("Sure.", [("write", {"path": values[0], "content": values[1]})]), values
        ref = parse_tool_calls(text, TOOLS)
        assert stream(text, TOOLS, [1] * len(text))[:2] == (ref[0], [(c.name, c.arguments_json) for c in ref[1]])


# ---------------------------------------------------------------------------------------------------------
# cost


def _big_text(n_chars: int) -> str:
    parts, i = [], 0
    while sum(map(len, parts)) < n_chars:
        parts.append(f"Step {i}: some prose <b>here</b>.\n")
        parts.append(call_text("write", [("path", f"f{i}.py"), ("content", "x = '</parameter>'\n" * 20)]) + "\n")
        i += 1
    return "".join(parts)


def test_whole_text_parse_is_fast():
    text = _big_text(20_000)
    t0 = time.perf_counter()
    content, calls = parse_tool_calls(text, TOOLS)
    assert time.perf_counter() - t0 < 0.5
    assert len(calls) > 10 and content.startswith("Step 0")


_SHAPES = {
    "calls": _big_text,
    "plain": lambda n: ("word <b> " * n)[:n],
    # held text that must not be re-scanned per character
    "function_close_in_value": lambda n: call_text("write", [("content", "</function>\n" + "y" * n)]),
    "many_function_closes": lambda n: call_text("write", [("content", "</function>" * (n // 11))]),
    "space_run": lambda n: "a" + " " * n + "b",
    "newlines_after_tool_call": lambda n: "<tool_call>" + "\n" * n + "x",
    "spaces_in_nullable_string": lambda n: call_text("edit", [("note", " " * n + "x")]),
    "spaces_after_parameter_close": lambda n: call_text("write", [("content", "</parameter>" + " " * n + "x")]),
}


@pytest.mark.parametrize("shape", list(_SHAPES))
def test_cost_is_linear(shape):
    def cost(n, by_char):
        text = _SHAPES[shape](n)
        best = float("inf")
        for _ in range(2):  # the machine is shared: keep the better of two
            p = StreamingToolParser(TOOLS)
            t0 = time.perf_counter()
            for k in range(0, len(text), 1 if by_char else len(text)):
                p.feed(text[k:k + (1 if by_char else len(text))])
            p.finish()
            best = min(best, time.perf_counter() - t0)
        return best

    for by_char in (True, False):
        small, big = cost(4_000, by_char), cost(16_000, by_char)
        assert big < 3.0
        assert big < 10 * small + 0.05, (by_char, small, big)  # 4x the text: linear ~4x, quadratic ~16x


# ---------------------------------------------------------------------------------------------------------
# tool_choice


def test_forced_tool_prefix():
    assert forced_tool_prefix("auto", TOOLS) == ""
    assert forced_tool_prefix(None, TOOLS) == ""
    assert forced_tool_prefix("none", TOOLS) == ""
    assert forced_tool_prefix("required", TOOLS) == "<tool_call>\n<function="
    assert forced_tool_prefix({"type": "any"}, TOOLS) == "<tool_call>\n<function="
    assert forced_tool_prefix({"type": "function", "function": {"name": "read"}}, TOOLS) == \
        "<tool_call>\n<function=read>\n"
    assert forced_tool_prefix({"type": "tool", "name": "Bash"}, TOOLS) == "<tool_call>\n<function=Bash>\n"


def test_validate_tool_choice():
    assert validate_tool_choice("auto", []) == ("auto", None)
    assert validate_tool_choice({"type": "none"}, TOOLS) == ("none", None)
    assert validate_tool_choice("required", TOOLS) == ("required", None)
    assert validate_tool_choice({"type": "function", "function": {"name": "edit"}}, TOOLS) == ("function", "edit")
    with pytest.raises(ValueError, match="'nosuch', which is not among the tools"):
        validate_tool_choice({"type": "function", "function": {"name": "nosuch"}}, TOOLS)
    with pytest.raises(ValueError, match="not among the tools"):
        validate_tool_choice({"type": "tool", "name": "nosuch"}, TOOLS)
    with pytest.raises(ValueError, match="non-empty tools"):
        validate_tool_choice("required", None)
    with pytest.raises(ValueError, match="non-empty tools"):
        validate_tool_choice({"type": "function", "function": {"name": "read"}}, [])
    for bad in ["sometimes", {"type": "weird"}, {"type": "function"}, {"type": "function", "function": {}}, 3]:
        with pytest.raises(ValueError):
            validate_tool_choice(bad, TOOLS)


def test_tool_call_helpers():
    _, calls = parse_tool_calls(call_text("read", [("path", "a"), ("limit", "2")]), TOOLS)
    c = calls[0]
    assert isinstance(c, ToolCall) and c.id.startswith("call_")
    assert c.to_openai() == {"id": c.id, "type": "function",
                             "function": {"name": "read", "arguments": '{"path": "a", "limit": 2}'}}
    assert c.to_anthropic() == {"type": "tool_use", "id": c.id, "name": "read", "input": {"path": "a", "limit": 2}}
    assert StreamingToolParser(TOOLS, id_prefix="toolu_").feed(call_text("read", []))[0].id.startswith("toolu_")
