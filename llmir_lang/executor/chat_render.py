"""A chat template rendered to text without importing transformers.

Only the bundled model's tokenizer is read without transformers (``tokenizer_files.py``); its
template is a short ChatML loop. ``render_chat`` renders such a template for one plain
conversation: a list of dicts whose values are strings, numbers, booleans, or lists / dicts of
those (None allowed inside them). The jinja environment is sandboxed and immutable, with the
settings Hugging Face chat templates are written for (blocks trimmed, ``break`` / ``continue``,
``raise_exception(msg)``, a ``tojson`` that keeps non-ASCII text and does not HTML-escape,
``strftime_now(fmt)``). Whatever falls outside that returns None, and the caller asks
transformers: message objects, a batch, a template with ``{% generation %}`` blocks, a message
carrying a reasoning field (whose aliases transformers fills in), and a message key whose value is
None (transformers 5.17 hands it to the template, 5.24 leaves it out).
``tests/executor/test_tokenizer_files.py`` checks the text against transformers' on the bundled
template and on templates that use each part of the environment.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\b")
# transformers copies a message's reasoning between these names before rendering: not done here
_REASONING_KEYS = frozenset({"reasoning", "reasoning_content", "thinking"})
_LEAVES = (str, int, float, bool, type(None))


def render_chat(
    template: Any, messages: Any, add_generation_prompt: bool, special_tokens: Mapping[str, str]
) -> str | None:
    """The conversation rendered by ``template``, or None where transformers should render it.
    ``special_tokens`` (``bos_token`` ... as text) are template variables. A template that fails
    raises jinja2's ``TemplateError`` (its syntax, ``raise_exception``, the sandbox)."""
    if not isinstance(template, str) or _GENERATION_BLOCK.search(template):
        return None
    if not isinstance(messages, (list, tuple)) or not messages:
        return None
    if not all(type(m) is dict and _REASONING_KEYS.isdisjoint(m) and _json_like(m) for m in messages):
        return None
    if any(v is None for m in messages for v in m.values()):
        return None
    env_template = _compiled(template)
    if env_template is None:
        return None
    # fresh copies: the template never holds the caller's objects
    chat = [json.loads(json.dumps(m)) for m in messages]
    variables = {str(k): str(v) for k, v in special_tokens.items()}
    return env_template.render(
        messages=chat, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **variables
    )


def _json_like(value: Any) -> bool:
    # NOTE: tuples are refused (a JSON round trip would make them lists, which a template can tell)
    if type(value) in _LEAVES:
        return not isinstance(value, float) or value == value and abs(value) != float("inf")
    if type(value) is list:
        return all(_json_like(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _json_like(v) for k, v in value.items())
    return False


def _to_json(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
             sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _fail(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """``template`` compiled in the sandbox (None where jinja2 is missing or older than 3.1.6, the
    version transformers requires for its sandbox fixes: transformers then reports it)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):
        return None
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _to_json
    env.globals.update(raise_exception=_fail, strftime_now=_now)
    return env.from_string(template)
