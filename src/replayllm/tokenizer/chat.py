"""Chat templates: the Jinja program a model file carries to turn a conversation into its prompt text.

The template comes from the model file and the messages from the user, so neither is trusted. Rendering
runs in Jinja's immutable sandbox (no access to private attributes or Python internals, no mutation of the
messages) with bounds on what a runaway template can cost: the template's size, the rendered text's size,
the total number of `range()` items, the size of every string or list built by `+`, `*`, `~`, a filter or
a method call, and integer arguments of filters and methods (widths, counts) no larger than that size.
Every failure is a `ReplayLLMError` that says what went wrong.

Templates follow the Hugging Face conventions: `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception(message)`, `strftime_now(format)`, `tojson`, blocks trimmed.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidParameterError, ReplayLLMError

MAX_TEMPLATE_BYTES = 256 * 1024
MAX_OUTPUT_CHARS = 1024 * 1024
MAX_RANGE_ITEMS = 100_000  # over a whole render, all range() calls together
_MAX_INT_EXPONENT = 1024

# Used when the model file has no template: ChatML, the most common format among small chat models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _TemplateRaised(Exception):
    """raise_exception() called by the template itself: its message is meant for the user."""


class _LimitExceeded(Exception):
    """The template tried to build or print more than the bounds allow."""


class _BoundedConcatCodeGenerator(CodeGenerator):
    # Jinja has no hook for the `~` operator; compile it to a method of the environment that checks sizes.
    def visit_Concat(self, node, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedConcatCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1 and right > _MAX_INT_EXPONENT:
            raise _LimitExceeded(f"{left} ** {right} is too large to compute")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if _is_sized(seq) and _is_int(count):
                    _check_size(len(seq) * max(count, 0))
        result = super().call_binop(context, operator, left, right)
        if operator == "+" and _is_sized(result):
            _check_size(len(result))
        return result

    # Double-underscore names, as in Jinja, so that no keyword argument of the template's call collides.
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805
        _check_arguments(args, kwargs)
        return _checked_result(super().call(__context, __obj, *args, **kwargs))

    def unsafe_undefined(self, obj, attribute):
        # Jinja's default turns a forbidden attribute into an undefined value that prints as "": a template
        # probing internals should fail loudly instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def bounded_concat(self, parts) -> str:
        text = "".join(str(part) for part in parts)
        _check_size(len(text))
        return text


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sized(value) -> bool:
    return isinstance(value, (str, list, tuple))


def _check_size(n_items: int) -> None:
    if n_items > MAX_OUTPUT_CHARS:
        raise _LimitExceeded(f"a value of {n_items} items exceeds the limit of {MAX_OUTPUT_CHARS}")


def _check_arguments(args, kwargs) -> None:
    # A width or count this large ('x'.center(10**9)) would allocate before any result could be checked.
    for value in (*args, *kwargs.values()):
        if _is_int(value) and abs(value) > MAX_OUTPUT_CHARS:
            raise _LimitExceeded(f"argument {value} exceeds the limit of {MAX_OUTPUT_CHARS}")


def _checked_result(value):
    if _is_sized(value):
        _check_size(len(value))
    return value


def _bounded_filter(function):
    # Filters are called directly by compiled templates, not through `call`, so each gets the same checks.
    # The filtered value itself (after the context or environment some filters take) is not an argument.
    n_leading = 2 if hasattr(function, "jinja_pass_arg") else 1

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        _check_arguments(args[n_leading:], kwargs)
        return _checked_result(function(*args, **kwargs))

    return bounded


def _raise_exception(message) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would corrupt prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> _ChatEnvironment:
    env = _ChatEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # generates text of any requested size, and no chat template needs it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def _budgeted_range(budget: int):
    remaining = budget

    def bounded_range(*args) -> range:
        nonlocal remaining
        items = range(*args)
        remaining -= len(items)
        if remaining < 0:
            raise _LimitExceeded(f"range() produced more than {budget} items in one render")
        return items

    return bounded_range


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "") -> str:
    """Render `messages` (dicts with a "role" and usually a "content") with a chat template.

    `template` None means the model has none: ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n` per message,
    then `<|im_start|>assistant\\n` when `add_generation_prompt`) is used instead.
    """
    source = CHATML_TEMPLATE if template is None else template
    _check_inputs(source, messages)
    try:
        compiled = _compile(source)
    except jinja2.TemplateSyntaxError as err:
        raise ReplayLLMError(f"chat template has a syntax error on line {err.lineno}: {err.message}") from err
    context = dict(messages=messages, add_generation_prompt=bool(add_generation_prompt),
                   bos_token=bos_token, eos_token=eos_token, range=_budgeted_range(MAX_RANGE_ITEMS))
    pieces, n_chars = [], 0
    try:
        for piece in compiled.generate(**context):
            n_chars += len(piece)
            if n_chars > MAX_OUTPUT_CHARS:
                raise _LimitExceeded(f"the rendered prompt exceeds {MAX_OUTPUT_CHARS} characters")
            pieces.append(piece)
    except _TemplateRaised as err:
        raise ReplayLLMError(f"the chat template rejected the conversation: {err}") from err
    except _LimitExceeded as err:
        raise ReplayLLMError(f"chat template stopped: {err}") from err
    except SecurityError as err:
        raise ReplayLLMError(f"chat template tried something the sandbox forbids: {err}") from err
    except Exception as err:  # the template's own logic failed on these messages (a TypeError, a KeyError...)
        raise ReplayLLMError(f"chat template failed on these messages: {type(err).__name__}: {err}") from err
    return "".join(pieces)


def _check_inputs(template, messages) -> None:
    if not isinstance(template, str):
        raise InvalidParameterError(f"the chat template must be a string, got {type(template).__name__}")
    size = len(template.encode("utf-8", errors="surrogatepass"))
    if size > MAX_TEMPLATE_BYTES:
        raise ReplayLLMError(f"chat template is {size} bytes; the limit is {MAX_TEMPLATE_BYTES}")
    if not isinstance(messages, list):
        raise InvalidParameterError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidParameterError(f"message {index} must be a dict with a string 'role', got {message!r:.80}")
