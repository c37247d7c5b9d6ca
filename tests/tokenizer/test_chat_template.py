"""Chat templates: Hugging Face conventions, the sandbox, the bounds, and clean errors."""

from __future__ import annotations

import datetime

import pytest

from replayllm.errors import InvalidParameterError, ReplayLLMError
from replayllm.tokenizer import render_chat
from replayllm.tokenizer.chat import MAX_OUTPUT_CHARS, MAX_TEMPLATE_BYTES

MESSAGES = [{"role": "user", "content": "Hi <b>é</b>"}, {"role": "assistant", "content": "Hello."}]


def test_no_template_falls_back_to_chatml():
    assert render_chat(None, MESSAGES) == (
        "<|im_start|>user\nHi <b>é</b><|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(None, MESSAGES, add_generation_prompt=False).endswith("Hello.<|im_end|>\n")


def test_context_variables():
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m['content'] }}{{ eos_token }}{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    assert render_chat(template, MESSAGES, True, bos_token="<s>", eos_token="</s>") == \
        "<s>[user]Hi <b>é</b></s>[assistant]Hello.</s>[assistant]"
    assert render_chat(template, MESSAGES, False) == "[user]Hi <b>é</b>[assistant]Hello."


def test_blocks_are_trimmed_and_loop_controls_exist():
    template = "{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{{ m.role }}\n{% endfor %}"
    assert render_chat(template, MESSAGES) == "user\n"


def test_tojson_does_not_escape_html():
    assert render_chat("{{ messages[0] | tojson }}", MESSAGES) == '{"role": "user", "content": "Hi <b>é</b>"}'


def test_strftime_now():
    assert render_chat("{{ strftime_now('%Y') }}", MESSAGES) in {
        str(datetime.datetime.now().year - 1), str(datetime.datetime.now().year)}


def test_raise_exception_reaches_the_user():
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('Conversations must start with a system " \
               "message') }}{% endif %}"
    with pytest.raises(ReplayLLMError, match="rejected the conversation: Conversations must start with a system"):
        render_chat(template, MESSAGES)


@pytest.mark.parametrize("template", [
    "{{ messages.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append({'role': 'user'}) }}",  # the sandbox is immutable: messages cannot be changed
    "{% set _ = messages[0].update({'role': 'system'}) %}",
])
def test_sandbox_blocks_internals_and_mutation(template):
    messages = [dict(m) for m in MESSAGES]
    with pytest.raises(ReplayLLMError, match="sandbox forbids"):
        render_chat(template, messages)
    assert messages == MESSAGES


def test_oversized_template_is_rejected():
    with pytest.raises(ReplayLLMError, match=f"limit is {MAX_TEMPLATE_BYTES}"):
        render_chat("x" * (MAX_TEMPLATE_BYTES + 1), MESSAGES)


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",  # printed output
    "{% for i in range(30000) %}{% for j in range(30000) %}{% endfor %}{% endfor %}",  # silent nested loops
    "{{ 'x' * 10**9 }}",
    "{{ [1] * 10**9 }}",
    "{{ 7 ** 100000000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s|replace('x', 'xx') %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s.replace('x', 'xx') %}{% endfor %}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ messages|tojson(indent=10**9) }}",
])
def test_runaway_templates_are_stopped(template):
    with pytest.raises(ReplayLLMError, match="chat template stopped"):
        render_chat(template, MESSAGES)


def test_large_numbers_are_fine_as_values():
    assert render_chat("{{ 123456789012|string }} {{ 10**7 }}", MESSAGES) == "123456789012 10000000"


def test_lipsum_is_not_available():
    with pytest.raises(ReplayLLMError, match="failed on these messages"):
        render_chat("{{ lipsum(n=1000000) }}", MESSAGES)


def test_output_just_under_the_limit_is_fine():
    text = render_chat("{{ 'x' * n }}".replace("n", str(MAX_OUTPUT_CHARS)), MESSAGES)
    assert len(text) == MAX_OUTPUT_CHARS


def test_syntax_error_names_the_line():
    with pytest.raises(ReplayLLMError, match="syntax error on line 2"):
        render_chat("ok\n{% for %}", MESSAGES)


def test_template_logic_errors_are_wrapped():
    with pytest.raises(ReplayLLMError, match="failed on these messages: TypeError"):
        render_chat("{{ messages[0]['content'] + 1 }}", MESSAGES)


@pytest.mark.parametrize(("template", "messages"), [
    (None, "hello"),
    (None, [{"content": "no role"}]),
    (None, ["not a dict"]),
    (42, MESSAGES),
])
def test_bad_arguments(template, messages):
    with pytest.raises(InvalidParameterError):
        render_chat(template, messages)
