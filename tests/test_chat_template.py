"""Chat prompts are the tokens transformers' `apply_chat_template` gives, for
template styles beyond SmolLM2's: one that writes its own BOS over a tokenizer
that adds one, a default system prompt, `tojson` / `raise_exception` / loop
controls / `namespace`, and tools with tool calls in the messages."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest
from transformers import AutoTokenizer

from loraserve import tokenizer as tokenizer_module
from loraserve.tokenizer import Tokenizer

BOS = "<|endoftext|>"

LLAMA3_STYLE = (  # writes the BOS itself, as the Llama 3 family does
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")

SYSTEM_DEFAULT = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONTROLS = """{%- set ns = namespace(turns=0) -%}
{%- for m in messages -%}
  {%- if m.role not in ['system', 'user', 'assistant'] -%}{{ raise_exception('no role ' + m.role + ' here') }}{%- endif -%}
  {%- if m.role == 'system' and not loop.first -%}{{ raise_exception('the system message must come first') }}{%- endif -%}
  {%- if m.content == '' -%}{% continue %}{%- endif -%}
  {%- set ns.turns = ns.turns + 1 -%}
  {{ m.role }}: {{ m.content | tojson }}
{% if ns.turns >= 3 %}{% break %}{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}assistant after {{ ns.turns }} turns:{%- endif -%}"""

TOOLS = """{%- if tools %}<|im_start|>system
# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for call in m.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response id="{{ m.tool_call_id }}">
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CHAT = [{"role": "system", "content": "Answer in <b>bold</b> & \"quotes\"."},
        {"role": "user", "content": "Où est la tour Eiffel ? 🗼"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "  And   the Louvre?  "}]

WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather <now> in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Zürich?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function",
                  "function": {"name": "weather", "arguments": json.dumps({"city": "Zürich"})}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "{\"temp_c\": 3}"}]


def tokenizer_dir(tiny, tmp_path, template: str, add_bos: bool = False):
    """The tiny model's tokenizer with `template` (and, if asked, a post-processor that adds a BOS)."""
    src = tiny("llama") / "model"
    tok = json.loads((src / "tokenizer.json").read_text())
    if add_bos:
        bos_id = tok["added_tokens"][0]["id"]
        assert tok["added_tokens"][0]["content"] == BOS
        tok["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(bos_token=BOS, chat_template=template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


def reference(path, messages, tools=None) -> list[int]:
    out = AutoTokenizer.from_pretrained(path).apply_chat_template(messages, tools=tools, tokenize=True,
                                                                   add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name,template,add_bos,messages,tools", [
    ("llama3-bos", LLAMA3_STYLE, True, CHAT, None),
    ("system-default", SYSTEM_DEFAULT, False, CHAT[1:], None),
    ("controls", CONTROLS, False, CHAT, None),
    ("tools", TOOLS, False, TOOL_CHAT, [WEATHER]),
])
def test_chat_tokens_equal_transformers(tiny, tmp_path, name, template, add_bos, messages, tools):
    path = tokenizer_dir(tiny, tmp_path, template, add_bos)
    ours = Tokenizer(path).chat_tokens(messages, tools)
    assert ours == reference(path, messages, tools)
    assert len(ours) > 10


def test_a_template_that_writes_its_bos_gets_one_bos(tiny, tmp_path):
    tok = Tokenizer(tokenizer_dir(tiny, tmp_path, LLAMA3_STYLE, add_bos=True))
    bos = tok.encode(BOS, add_special_tokens=False)
    assert len(bos) == 1
    ids = tok.chat_tokens(CHAT)
    assert ids[0] == bos[0] and ids[1] != bos[0]
    # what encoding the rendered text with special tokens gives (and what loraserve did): two
    assert tok.encode(tok.render_chat(CHAT))[:2] == bos * 2


def test_the_smollm2_template_equals_transformers(tiny):
    path = tiny("llama") / "model"
    for messages in (CHAT[1:], [{"role": "user", "content": "hi"}]):
        assert Tokenizer(path).chat_tokens(messages) == reference(path, messages)


def test_template_errors_name_the_problem(tiny, tmp_path):
    tok = Tokenizer(tokenizer_dir(tiny, tmp_path, CONTROLS))
    with pytest.raises(jinja2.TemplateError, match="no role tool here"):
        tok.chat_tokens(TOOL_CHAT)
    with pytest.raises(jinja2.TemplateError, match="must come first"):
        tok.chat_tokens([CHAT[1], CHAT[0]])
    # the sandbox refuses what a template from a model directory must not do
    evil = Tokenizer(tokenizer_dir(tiny, tmp_path, "{{ messages.__class__.__mro__ }}"))
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.chat_tokens(CHAT)


def test_a_template_is_compiled_once_per_tokenizer(tiny, tmp_path, monkeypatch):
    compiled = []
    env = tokenizer_module._environment()
    original = type(env).from_string
    monkeypatch.setattr(type(env), "from_string", lambda self, *a, **k: compiled.append(1) or original(self, *a, **k))
    tok = Tokenizer(tokenizer_dir(tiny, tmp_path, SYSTEM_DEFAULT))
    first = tok.chat_tokens(CHAT[1:])
    for _ in range(5):
        assert tok.chat_tokens(CHAT[1:]) == first
    assert len(compiled) == 1


def test_chat_template_kwargs_reach_the_template(tiny, tmp_path):
    template = "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}{{ messages[0].content }}"
    tok = Tokenizer(tokenizer_dir(tiny, tmp_path, template))
    plain = tok.render_chat(CHAT[1:2])
    assert tok.render_chat(CHAT[1:2], template_kwargs={"enable_thinking": False}) == "/no_think " + plain
    # a switch cannot replace what the template is rendering
    assert tok.render_chat(CHAT[1:2], template_kwargs={"messages": [{"role": "user", "content": "x"}]}) == plain


def test_a_model_directory_template_file_wins(tiny, tmp_path):
    path = tokenizer_dir(tiny, tmp_path, SYSTEM_DEFAULT)
    shutil.copy(tiny("llama") / "model" / "chat_template.jinja", path / "chat_template.jinja")
    assert Tokenizer(path).chat_tokens(CHAT[1:]) == reference(path, CHAT[1:])
