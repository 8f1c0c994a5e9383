"""ChatTemplate: loading from the checkpoint, HF-compatible rendering, normalisation, the sandbox."""

import json

import pytest

from qnext.chat_template import ChatTemplate, ChatTemplateError

# A small template in the style of Qwen's (written for this test): tools in the system turn,
# tool-call arguments iterated as a mapping, generation prompt.
TEMPLATE = """{%- if tools %}
<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are helpful.' }}
<tools>
{%- for tool in tools %}
{{ (tool.function if tool.function is defined else tool) | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}{{ part.text }}{% endfor %}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
<function={{ call.function.name }}>
{%- for name, value in call.function.arguments | items %}
<parameter={{ name }}>
{{ value if value is string else value | tojson }}
</parameter>
{%- endfor %}
</function>
</tool_call>
{%- endfor %}
<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>
{% endif %}
{%- endif %}"""

MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Zürich?"}]},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "days": [1, 2]}'}}
    ]},
    {"role": "tool", "content": "<sunny>"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "a < b & c",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def write_ckpt(root, jinja=None, config_template=None):
    cfg = {"eos_token": "<|im_end|>", "bos_token": None}
    if config_template is not None:
        cfg["chat_template"] = config_template
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja is not None:
        (root / "chat_template.jinja").write_text(jinja)
    return root


def test_load_from_jinja_file_and_render(tmp_path):
    ct = ChatTemplate.from_pretrained(write_ckpt(tmp_path, jinja=TEMPLATE, config_template="IGNORED"))
    out = ct.render(MESSAGES, tools=TOOLS)
    assert out.startswith("<|im_start|>system\nBe terse.\n<tools>{\"name\": \"get_weather\"")
    assert '"description": "a < b & c"' in out  # tojson: no HTML escaping, no ASCII escaping
    assert "<|im_start|>user\nWeather in Zürich?<|im_end|>" in out  # content lists pass through
    assert "<function=get_weather><parameter=city>\nZürich\n</parameter><parameter=days>\n[1, 2]\n</parameter>" in out
    assert "<|im_start|>tool\n<sunny><|im_end|>" in out
    assert out.endswith("<|im_start|>assistant\n")
    assert not ct.render(MESSAGES, tools=TOOLS, add_generation_prompt=False).endswith("assistant\n")
    assert ct.render(MESSAGES[1:2], enable_thinking=False).endswith("<think>\n\n</think>\n")
    assert MESSAGES[2]["tool_calls"][0]["function"]["arguments"].startswith("{")  # caller's messages untouched


def test_load_from_tokenizer_config(tmp_path):
    ct = ChatTemplate.from_pretrained(write_ckpt(tmp_path, config_template="{{ eos_token }}|{{ messages[0].content }}"))
    assert ct.render([{"role": "user", "content": "hi"}]) == "<|im_end|>|hi"
    assert ct.render([{"role": "user", "content": "hi"}], eos_token="X") == "X|hi"  # kwargs override special tokens


def test_named_templates_pick_tool_use(tmp_path):
    named = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools={{ tools | length }}"}]
    ct = ChatTemplate.from_pretrained(write_ckpt(tmp_path, config_template=named))
    assert ct.render([]) == "plain"
    assert ct.render([], tools=TOOLS) == "tools=1"


def test_matches_transformers(tmp_path):
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    for tools in (None, TOOLS):
        for gen in (True, False):
            ours = ChatTemplate(TEMPLATE).render(MESSAGES[:2], tools=tools, add_generation_prompt=gen)
            (theirs,), _ = hf.render_jinja_template(
                conversations=[MESSAGES[:2]], tools=tools, chat_template=TEMPLATE, add_generation_prompt=gen
            )
            assert ours == theirs


def test_globals_and_extensions():
    ct = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}{{ m.content }}"
        "{% endgeneration %}{% endfor %}|{{ strftime_now('%Y') | length }}"
    )
    assert ct.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a|4"


def test_errors_are_value_errors(tmp_path):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate.from_pretrained(write_ckpt(tmp_path))
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
    ct = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}ok")
    with pytest.raises(ValueError, match="roles must alternate"):
        ct.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages[0].tool_calls[0].function.arguments | items | list }}").render(
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]}]
        )


@pytest.mark.parametrize("src", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}{{ cycler.__init__.__globals__ }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_sandbox_blocks_unsafe_access(src):
    with pytest.raises(ChatTemplateError):
        ChatTemplate(src).render([{"role": "user", "content": "hi"}])
