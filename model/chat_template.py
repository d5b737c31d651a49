"""Chat templates: a conversation -> the exact text an instruction-tuned model was trained on.

Each chat model ships a Jinja template that writes a list of messages ({"role", "content"}) as one
string: its role headers, separators and end-of-turn tokens. Fine-tune on any other layout and
the model learns a format it will never be prompted with, or never learns to stop. So we render
the model's own template, as transformers does, and tokenize the result without adding BOS again
(templates that want BOS write `{{ bos_token }}` themselves):

    text = render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                       special_tokens={"bos_token": "<s>", "eos_token": "</s>"})

The template runs in jinja2's sandbox (`ImmutableSandboxedEnvironment`, no access to Python
internals, no changing the messages), with what transformers gives templates: `trim_blocks` and
`lstrip_blocks`, `break`/`continue`, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` that
keeps non-ASCII text and `<`/`>` as they are (json.dumps, not Jinja's HTML-safe one), a `namespace`
that refuses `_private` names, and the `{% generation %}` tag (rendered as its plain body).
Variables: `messages`, `tools` and `documents` (None unless given), `add_generation_prompt`, and
the special-token strings `bos_token`, `eos_token`, `unk_token`, `pad_token` that the tokenizer has.
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import jinja2

# ChatML (SmolLM2, Qwen): offered for models without a template, and only when asked for by name:
#     tok.chat_template = CHATML
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Names a message's reasoning may come under; templates read `reasoning_content` (gpt-oss: `thinking`).
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`), or failed while rendering it."""


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> "jinja2.Template":
    """The template compiled once in the sandbox (cached by its text)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' masks: render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` that refuses underscore names, the way into Python's internals."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=Namespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from e


def _plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Copies the template sees: keys whose value is None dropped (as OpenAI's `content=None`), and a
    message's reasoning under each name templates read."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("a conversation is a non-empty list of messages ({'role': ..., 'content': ...})")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_KEYS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                special_tokens: dict[str, str] | None = None, tools: list | None = None,
                documents: list | None = None, **template_kwargs) -> str:
    """The conversation as the template writes it.

    `special_tokens`: {"bos_token": ..., "eos_token": ...} as the tokenizer names them;
    `template_kwargs` (e.g. `enable_thinking=False`, `date_string=...`) are passed to the template
    and win over them. A template's `raise_exception`, or any error while rendering, becomes
    `ChatTemplateError` (a ValueError) with the template's message.
    """
    import jinja2

    compiled = compile_template(template)
    variables = {**(special_tokens or {}), **template_kwargs}
    try:
        return compiled.render(messages=_plain_messages(messages), tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from e
    except (TypeError, KeyError, AttributeError, IndexError) as e:  # e.g. a message without 'content'
        raise ChatTemplateError(f"chat template failed on this conversation: {type(e).__name__}: {e}") from e


def read_chat_template(folder: str) -> str | None:
    """An HF folder's chat template: `chat_template.jinja` (newer), else `tokenizer_config.json`'s
    "chat_template": a string, or a list of {"name", "template"} of which we take "default"."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    file = os.path.join(folder, "tokenizer_config.json")
    value = _read_config(file).get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in value):
        named = {t["name"]: t["template"] for t in value}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{file}: chat_template lists templates {sorted(named)} but none named 'default'")
    raise ValueError(f"{file}: chat_template must be a string or a list of {{'name', 'template'}}, "
                     f"got {type(value).__name__}")


def _read_config(file: str) -> dict[str, Any]:
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
