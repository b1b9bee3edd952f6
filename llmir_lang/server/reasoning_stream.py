"""Reasoning split off chat completions (``llmir serve --reasoning-parser NAME``), whole or streamed.

A plain answer is split with ``llmir_lang.ir.reasoning.split_reasoning`` (SGLang's non-streamed
parse). A stream is split by ``ReasoningSplitter``, whose pieces, joined, are exactly that split of
the whole text, however the text was cut into chunks (a tag cut between chunks included). What it
holds back, and why, follows from ``split_reasoning``'s rules:

- a format whose model writes its own start tag (``qwen3``, ...): every chunk until a start tag
  appears, because text before a late start tag is reasoning, and with none at all the whole text
  is the answer, untouched;
- the end of a text that may be the beginning of a start tag (they are removed everywhere) or of
  the end tag (the reasoning ends at the first one);
- whitespace that may turn out to end the text (the split strips it), and the answer's leading
  whitespace.

``ChatReasoning`` is what one chat request asks of the server's parser (``separate_reasoning``,
``stream_reasoning``, ``chat_template_kwargs``' ``enable_thinking`` / ``thinking``), and its
``gate`` puts the request's constraint after the reasoning;
``ChatDeltas`` turns streamed text into chat ``delta`` objects, with or without a parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmir_lang.ir.reasoning import FORMATS, split_reasoning
from llmir_lang.server.constraint_gate import gated
from llmir_lang.server.errors import ServerHTTPError

_UNDECIDED, _REASONING, _ANSWER, _PLAIN = range(4)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is the beginning of ``tag`` (not all of it)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningSplitter:
    """Splits a streamed text into reasoning and answer pieces as ``split_reasoning`` splits it.

    ``feed(text)`` and ``finish()`` return ``(reasoning, answer)``: the pieces known now. Joined,
    the reasoning pieces are ``split_reasoning(model_type, whole)[0]`` and the answer pieces its
    ``[1]``, where ``whole`` is every fed text joined (with ``forced``: the format's start tag +
    that, see ``split_forced``); every reasoning piece comes before the first answer piece.
    ``reasoning_done``: no more reasoning will come (the end tag was seen, or there is none).
    """

    def __init__(self, model_type: str, *, forced: bool = False) -> None:
        fmt = FORMATS[model_type]
        self._start, self._end = fmt.start, fmt.end
        self._prefix = fmt.start if fmt.prepend_start else ""  # minimax-append-think's answer begins with it
        if fmt.prepend_start:
            self._phase = _PLAIN
        else:
            self._phase = _REASONING if fmt.forced or forced else _UNDECIDED
        self._raw: list[str] = []  # undecided: the text so far
        self._tail = ""  # undecided: its last len(start) - 1 characters (a start tag may span chunks)
        self._tag_held = ""  # text that may begin a start tag
        self._lead = True  # still dropping the whitespace the reasoning / the answer begins with
        self._pending = ""  # text held back: trailing whitespace, the beginning of an end tag

    @property
    def reasoning_done(self) -> bool:
        return self._phase in (_ANSWER, _PLAIN)

    def feed(self, text: str) -> tuple[str, str]:
        if self._phase == _PLAIN:
            out, self._prefix = self._prefix + text, ""
            return "", out
        if self._phase == _UNDECIDED:
            window = self._tail + text
            self._raw.append(text)
            if self._start not in window:
                self._tail = window[max(0, len(window) - len(self._start) + 1) :]
                return "", ""
            self._phase = _REASONING  # a start tag: everything so far is the text to split
            text, self._raw = "".join(self._raw), []
        return self._route(self._without_start_tags(text))

    def finish(self) -> tuple[str, str]:
        if self._phase == _PLAIN:
            out, self._prefix = self._prefix, ""
            return "", out
        if self._phase == _UNDECIDED:  # no start tag anywhere: the answer is the text, untouched
            out, self._raw = "".join(self._raw), []
            return "", out
        held, self._tag_held = self._tag_held, ""
        reasoning, answer = self._route(held)
        if self._phase == _REASONING:  # no end tag: all of it is reasoning, its end stripped
            reasoning += self._pending.rstrip()
            self._phase = _ANSWER
        self._pending = ""  # the answer's trailing whitespace (stripped)
        return reasoning, answer

    def _without_start_tags(self, text: str) -> str:
        """``text`` with every start tag removed, as ``str.replace`` over the whole text removes
        them (left to right, not overlapping): the end that may begin one is held back."""
        s, start = self._tag_held + text, self._start
        out, i = [], 0
        while (j := s.find(start, i)) >= 0:
            out.append(s[i:j])
            i = j + len(start)
        rest = s[i:]
        keep = len(rest) - _partial_tag(rest, start)
        out.append(rest[:keep])
        self._tag_held = rest[keep:]
        return "".join(out)

    def _route(self, text: str) -> tuple[str, str]:
        """The next text (start tags removed) as reasoning and answer pieces."""
        reasoning = ""
        if self._phase == _REASONING:
            if self._lead:
                text = text.lstrip()
                if not text:
                    return "", ""
                self._lead = False
            s = self._pending + text
            j = s.find(self._end)
            if j < 0:
                body = s[: len(s) - _partial_tag(s, self._end)]
                reasoning = body.rstrip()
                self._pending = s[len(reasoning) :]
                return reasoning, ""
            reasoning, text = s[:j], s[j + len(self._end) :]
            self._phase, self._pending, self._lead = _ANSWER, "", True
        if self._lead:
            text = text.lstrip()
            if not text:
                return reasoning, ""
            self._lead = False
        s = self._pending + text
        answer = s.rstrip()
        self._pending = s[len(answer) :]
        return reasoning, answer


@dataclass(frozen=True, slots=True)
class ChatReasoning:
    """How one chat request's output is split: ``model_type`` (the server's parser), ``forced``
    (the output begins inside the reasoning, whatever the format says), ``stream_reasoning``
    (False: a stream's reasoning goes out in one delta once it has ended)."""

    model_type: str
    forced: bool = False
    stream_reasoning: bool = True

    def split(self, text: str) -> tuple[str, str]:
        """``(reasoning, answer)`` of a whole output."""
        return split_reasoning(self.model_type, _forced_text(self.model_type, text, self.forced))

    def gate(self, spec: Any) -> Any:
        """The request's constraint (``response_format``, ``guided_*``, ``regex`` ...) applied
        after the reasoning, as SGLang's reasoner grammar applies it: the model reasons freely up
        to the end tag, and the constraint covers the answer, ``content``
        (``executor/constraints/reasoning_gate.py``). None stays None; a constraint that spells
        the end tag itself covers the whole output (``gated_by_reasoning``)."""
        return gated(spec, self.model_type, self.forced)


def chat_message(text: str, reasoning: ChatReasoning | None) -> dict[str, Any]:
    """The ``message`` of a plain chat answer. Split, the reasoning and the answer are null where
    empty (as on SGLang and vLLM: ``content`` is null when ``max_tokens`` cut the reasoning)."""
    if reasoning is None:
        return {"role": "assistant", "content": text}
    thought, answer = reasoning.split(text)
    return {"role": "assistant", "content": answer or None, "reasoning_content": thought or None}


def _forced_text(model_type: str, text: str, forced: bool) -> str:
    # Starting inside the reasoning is the split of the text after a start tag (a leading start
    # tag is removed like every other, and the rules then read the text the same way).
    fmt = FORMATS[model_type]
    return fmt.start + text if forced and not fmt.prepend_start else text


def chat_reasoning(parser: str | None, body: Any) -> ChatReasoning | None:
    """What ``body`` (a chat request) asks of the server's reasoning ``parser``; None: no split
    (no parser, ``separate_reasoning: false``, or thinking turned off, see below).

    ``chat_template_kwargs``' ``enable_thinking`` (Qwen3's name), else ``thinking`` (DeepSeek
    V3.1's), as SGLang reads them: true makes the output begin inside the reasoning (those
    templates open it in the prompt); false, for a format whose model writes its own start tag,
    means no split (the template closed the reasoning in the prompt: the output is the answer).
    A format whose model always begins inside the reasoning (``deepseek-r1``) ignores false."""
    if parser is None or not body.separate_reasoning:
        return None
    thinking = _thinking(body.chat_template_kwargs)
    fmt = FORMATS[parser]
    if thinking is False and not fmt.forced and not fmt.prepend_start:
        return None
    return ChatReasoning(parser, forced=bool(thinking), stream_reasoning=body.stream_reasoning)


def _thinking(kwargs: dict[str, Any] | None) -> bool | None:
    for key in ("enable_thinking", "thinking"):
        value = (kwargs or {}).get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise ServerHTTPError(
                400,
                f"chat_template_kwargs.{key} must be true or false, got {value!r}",
                param=f"chat_template_kwargs.{key}",
            )
        return value
    return None


class ChatDeltas:
    """Chat stream ``delta`` objects (``{"content": ...}``, ``{"reasoning_content": ...}``) of the
    streamed text of one request: ``feed(text)`` per chunk, ``finish()`` at its end. The stream's
    first delta carries the role (``{"role": "assistant", "content": ""}`` where the first chunk
    gives no text)."""

    def __init__(self, reasoning: ChatReasoning | None) -> None:
        self._split = None
        if reasoning is not None:
            self._split = ReasoningSplitter(reasoning.model_type, forced=reasoning.forced)
        self._stream_reasoning = reasoning is None or reasoning.stream_reasoning
        self._held = ""  # stream_reasoning false: the reasoning until it ends
        self._first = True

    def feed(self, text: str, *, keep: bool = False) -> list[dict[str, str]]:
        """The deltas of the next ``text``; ``keep``: at least one (it carries the chunk's logprobs)."""
        if self._split is None:
            out = [{"content": text}] if text else []
        else:
            out = self._deltas(*self._split.feed(text), done=self._split.reasoning_done)
        return self._with_role(out or ([{"content": ""}] if keep or self._first else []))

    def finish(self) -> list[dict[str, str]]:
        """What was held back, once the text has ended."""
        if self._split is None:
            return []
        return self._with_role(self._deltas(*self._split.finish(), done=True))

    def _deltas(self, reasoning: str, answer: str, done: bool) -> list[dict[str, str]]:
        if not self._stream_reasoning:
            self._held += reasoning
            reasoning = ""
            if done:
                reasoning, self._held = self._held, ""
        out = [{"reasoning_content": reasoning}] if reasoning else []
        return out + ([{"content": answer}] if answer else [])

    def _with_role(self, deltas: list[dict[str, str]]) -> list[dict[str, str]]:
        if deltas and self._first:
            deltas[0] = {"role": "assistant", **deltas[0]}
            self._first = False
        return deltas
