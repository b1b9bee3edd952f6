"""The role markers a program's roles render to: derived from the backend's own chat template.

``chat_roles(backend)`` derives the begin / end text of each role from what the backend's
``apply_chat_template`` renders (``optimizer.chat_template``), once per backend; ``LazyRoles``
defers that until a role is first rendered, so a program without roles never renders a template.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from llmir_lang.dsl.errors import RoleError
from llmir_lang.executor.backend import Backend
from llmir_lang.optimizer import ChatTemplate
from llmir_lang.optimizer.chat_template import derive_chat_template

_TEMPLATES: weakref.WeakKeyDictionary[Any, ChatTemplate] = weakref.WeakKeyDictionary()
_TEMPLATES_LOCK = threading.Lock()


def chat_roles(backend: Backend) -> ChatTemplate:
    """The role markers of ``backend``'s chat template (derived once per backend, then cached)."""
    with _TEMPLATES_LOCK:
        cached = _TEMPLATES.get(backend)
    if cached is not None:
        return cached

    def render(messages: list[dict[str, str]]) -> str:
        return backend.apply_chat_template(messages, add_generation_prompt=False)

    template = derive_chat_template(render, source=type(backend).__name__)
    with _TEMPLATES_LOCK:
        _TEMPLATES[backend] = template
    return template


class LazyRoles:
    """A ``RoleRenderer`` that derives the backend's template only when a role is rendered."""

    def __init__(self, backend: Backend | None) -> None:
        self.backend = backend

    def begin(self, role: str) -> str:
        return self._template().begin(role)

    def end(self, role: str) -> str:
        return self._template().end(role)

    def _template(self) -> ChatTemplate:
        if self.backend is None:
            raise RoleError("roles render through the backend's chat template, and no backend is set")
        return chat_roles(self.backend)


__all__ = ["LazyRoles", "chat_roles"]
