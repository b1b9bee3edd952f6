"""The reasoning formats (SGLang's reasoning parsers whose reasoning is a pair of tags): their
tags, and the tags a constraint that starts after the reasoning waits for.

Plain data, kept in the executor because a remote backend maps a server's ``reasoning_parser``
name to its end tag (``remote_reasoning.py``); ``ir.reasoning`` splits texts by these formats
and re-exports the names. Imports go down only: ``ir`` reads this, never the other way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReasoningFormat:
    """A reasoning parser: its tags, and whether the output begins inside the reasoning."""

    start: str
    end: str
    forced: bool  # the model starts inside the reasoning (no start tag needed)
    prepend_start: bool = False  # no split: the answer is the start tag + the text


_THINK = ReasoningFormat("<think>", "</think>", forced=False)
_THINK_FORCED = ReasoningFormat("<think>", "</think>", forced=True)

FORMATS: dict[str, ReasoningFormat] = {
    "deepseek-r1": _THINK_FORCED,
    "deepseek-v3": _THINK,
    "glm45": _THINK,
    "interns1": _THINK,
    "kimi": ReasoningFormat("\u25c1think\u25b7", "\u25c1/think\u25b7", forced=False),  # ◁think▷ ◁/think▷
    "kimi_k2": _THINK_FORCED,
    "minimax": _THINK_FORCED,
    "minimax-append-think": ReasoningFormat("<think>", "</think>", forced=False, prepend_start=True),
    "nano_v3": _THINK,
    "qwen3": _THINK,
    "qwen3-thinking": _THINK_FORCED,
    "step3": _THINK_FORCED,
}

# Names SGLang's parser takes whose format is not a pair of tags split as above: not implemented.
UNSUPPORTED_FORMATS: dict[str, str] = {
    "gpt-oss": "its reasoning is a harmony channel (<|channel|>analysis<|message|>...<|end|>), not a pair of tags",
    "olmo3": "its parser splits at the first </think> without stripping whitespace, unlike the others",
}


def gate_tags(model_type: str, forced: bool = False) -> tuple[str, str, bool]:
    """``(start, end, forced)`` of format ``model_type`` for a constraint that starts after the
    reasoning (``executor.constraints.ReasoningTags``). ``forced``: the output begins inside the
    reasoning whatever the format says (a chat template that opened it in the prompt).
    ``minimax-append-think``'s output begins inside it too: its parser puts ``<think>`` back."""
    fmt = FORMATS[model_type]
    return fmt.start, fmt.end, fmt.forced or fmt.prepend_start or forced


__all__ = ["FORMATS", "UNSUPPORTED_FORMATS", "ReasoningFormat", "gate_tags"]
