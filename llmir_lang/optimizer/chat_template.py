"""Role markers: how ``role.begin`` / ``role.end`` render to text, derived from a chat template.

``canonicalize`` takes any object with ``begin(role) -> str`` and ``end(role) -> str`` (the
``RoleRenderer`` protocol), or a plain callable ``render_role(role, is_begin) -> str``.
``chat_template_from_tokenizer`` derives a ``ChatTemplate`` from a Hugging Face tokenizer by
rendering probe conversations through its own ``apply_chat_template`` (``derive_chat_template``
does the same from any ``render(messages) -> str``, e.g. a backend's), so that the text the
frontend produces for a role is exactly the text the model was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llmir_lang.errors import IRError


class ChatTemplateError(IRError, ValueError):
    """A role cannot be rendered, or a tokenizer's chat template cannot be probed."""


@runtime_checkable
class RoleRenderer(Protocol):
    """Renders the text that opens and closes a message of ``role``."""

    def begin(self, role: str) -> str: ...

    def end(self, role: str) -> str: ...


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """Begin / end text per role, plus ``prefix``: what the template puts before a conversation
    that starts with a user message (a BOS token, a default system prompt). ``canonicalize`` does
    not insert ``prefix``; a frontend that wants the template's exact conversation start may."""

    roles: Mapping[str, tuple[str, str]]
    prefix: str = ""
    source: str = field(default="", compare=False)

    def begin(self, role: str) -> str:
        return self._get(role)[0]

    def end(self, role: str) -> str:
        return self._get(role)[1]

    def _get(self, role: str) -> tuple[str, str]:
        try:
            return self.roles[role]
        except KeyError:
            known = ", ".join(sorted(self.roles)) or "none"
            raise ChatTemplateError(
                f"the chat template{' of ' + self.source if self.source else ''} has no role {role!r}; "
                f"roles: {known}"
            ) from None


@dataclass(frozen=True, slots=True)
class CallableRoleRenderer:
    """Adapts ``render_role(role, is_begin) -> str`` to the ``RoleRenderer`` protocol."""

    render_role: Callable[[str, bool], str]

    def begin(self, role: str) -> str:
        return self.render_role(role, True)

    def end(self, role: str) -> str:
        return self.render_role(role, False)


def as_role_renderer(template: RoleRenderer | Callable[[str, bool], str]) -> RoleRenderer:
    """``template`` as a ``RoleRenderer`` (wrapping a ``render_role`` callable)."""
    if isinstance(template, RoleRenderer):
        return template
    if callable(template):
        return CallableRoleRenderer(template)
    raise ChatTemplateError(
        f"template must have begin(role)/end(role) or be a callable render_role(role, is_begin), "
        f"got {type(template).__name__}"
    )


# Probe contents: plain words a template will neither escape nor strip.
_PROBES = ("LLMIRPROBEA", "LLMIRPROBEB", "LLMIRPROBEC", "LLMIRPROBES")


def chat_template_from_tokenizer(
    tokenizer: Any, roles: Sequence[str] = ("system", "user", "assistant")
) -> ChatTemplate:
    """Derive role begin / end text from a Hugging Face tokenizer's ``apply_chat_template``
    (called with ``tokenize=False, add_generation_prompt=False``); see ``derive_chat_template``."""
    source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    return derive_chat_template(
        render, roles, bos_token=getattr(tokenizer, "bos_token", None) or "", source=source
    )


def derive_chat_template(
    render_conversation: Callable[[list[dict[str, str]]], str],
    roles: Sequence[str] = ("system", "user", "assistant"),
    *,
    bos_token: str = "",
    source: str = "",
) -> ChatTemplate:
    """Derive role begin / end text from ``render_conversation(messages) -> str`` (a chat template
    applied without a generation prompt, e.g. a backend's ``apply_chat_template``).

    Renders ``[user A]``, ``[user A, assistant B]``, ``[user A, assistant B, user C]`` and
    ``[system S, user A]`` and reads each marker off the text between the probe contents.
    ``system`` is skipped (absent from the result) if the template rejects a system message; a
    ``bos_token`` the template writes before the system message goes to ``prefix``. Raises
    ``ChatTemplateError`` if the template renders a role differently depending on what follows
    it, which a begin/end pair cannot express.
    """
    source = source or "the given renderer"
    a, b, c, s = _PROBES

    def render(messages: list[dict[str, str]]) -> str:
        try:
            out = render_conversation(messages)
        except Exception as e:  # templates raise arbitrary errors (jinja raise_exception)
            raise ChatTemplateError(f"chat template of {source} failed on a probe conversation: {e}") from e
        if not isinstance(out, str):
            raise ChatTemplateError(f"the chat template of {source} rendered {type(out).__name__}, not text")
        return out

    def split(text: str, *probes: str) -> list[str]:
        parts: list[str] = []
        for p in probes:
            if text.count(p) != 1:
                raise ChatTemplateError(f"chat template of {source} does not render message content verbatim")
            head, text = text.split(p)
            parts.append(head)
        parts.append(text)
        return parts

    def strip_front(text: str, front: str, what: str) -> str:
        if not text.startswith(front):
            raise ChatTemplateError(f"chat template of {source}: {what} depends on the next message")
        return text[len(front) :]

    head_u, end_user = split(render([{"role": "user", "content": a}]), a)
    _, between_ab, end_assistant = split(
        render([{"role": "user", "content": a}, {"role": "assistant", "content": b}]), a, b
    )
    begin_assistant = strip_front(between_ab, end_user, "the end of a user message")
    _, _, between_bc, _ = split(
        render(
            [
                {"role": "user", "content": a},
                {"role": "assistant", "content": b},
                {"role": "user", "content": c},
            ]
        ),
        a,
        b,
        c,
    )
    begin_user = strip_front(between_bc, end_assistant, "the end of an assistant message")
    if not head_u.endswith(begin_user):
        raise ChatTemplateError(f"chat template of {source}: the first user message opens differently")
    prefix = head_u[: len(head_u) - len(begin_user)]
    table: dict[str, tuple[str, str]] = {
        "user": (begin_user, end_user),
        "assistant": (begin_assistant, end_assistant),
    }
    if "system" in roles:
        try:
            head_s, between_sa, _ = split(
                render([{"role": "system", "content": s}, {"role": "user", "content": a}]), s, a
            )
        except ChatTemplateError:
            head_s = None
        if head_s is not None and between_sa.endswith(begin_user):
            if prefix and head_s.startswith(prefix):
                head_s = head_s[len(prefix) :]
            elif bos_token and head_s.startswith(bos_token):
                head_s = head_s[len(bos_token) :]
            table["system"] = (head_s, between_sa[: len(between_sa) - len(begin_user)])
    unknown = [r for r in roles if r not in ("system", "user", "assistant")]
    if unknown:
        raise ChatTemplateError(f"cannot probe roles {unknown}; only system, user and assistant are derived")
    return ChatTemplate({r: table[r] for r in roles if r in table}, prefix, source)
