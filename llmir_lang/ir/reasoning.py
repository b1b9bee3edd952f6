"""Reasoning formats: what a gen's or select's ``reasoning`` attribute does to its value.

``separate_reasoning(gen("answer"), model_type="deepseek-r1")`` records ``reasoning =
"deepseek-r1"`` on the gen. When the gen has finished, its text is split in two: variable
``answer`` is the final answer, variable ``answer_reasoning_content`` (``reasoning_variable``) the
reasoning, and the answer, not the generated text, is what the gen appends to the state.

The formats are the ones of SGLang's ``ReasoningParser`` whose reasoning is a pair of tags (its
``DetectorMap``, by name, matched case-insensitively): ``FORMATS``. ``split_reasoning`` is the
one-shot parse SGLang's ``parse_non_stream`` does (its ``detect_and_parse``), rule by rule:

1. ``minimax-append-think`` does not split: the answer is ``<think>`` + the text, the reasoning
   is empty.
2. A format that is not *forced* (its model writes the start tag itself: ``qwen3``, ...) and whose
   start tag occurs nowhere in the text: the answer is the whole text, untouched (its whitespace
   too), the reasoning is empty.
3. Otherwise the text is reasoning up to the end tag (a forced format's model begins inside the
   reasoning: ``deepseek-r1``'s output need not hold ``<think>``): every start tag is removed,
   wherever it occurs, and the whitespace around the whole text is stripped (``str.strip``).
4. No end tag left: all of it is reasoning (cut short by ``max_tokens`` or a stop), the answer is
   empty.
5. Else it is split at the first end tag: the reasoning is what comes before it, as it is (its
   leading whitespace went in rule 3, its trailing whitespace stays: ``"<think>\\nhm\\n</think>"``
   gives ``"hm\\n"``), the answer what comes after it, stripped. A later end tag stays in the answer.

``gate_tags`` / ``gated_answer``: a constraint of a gen in ``separate_reasoning`` (or of a chat
request to ``llmir serve --reasoning-parser``) covers the answer only: the engine lets the
reasoning run free until the end tag (``executor/constraints/reasoning_gate.py``).

These are the rules of SGLang's releases from 0.4.6 on (0.4.10 is the reference the tests compare
with when it is installed); its development branch has since stopped stripping whitespace.
"""

from __future__ import annotations

from llmir_lang.executor.reasoning_formats import (  # the table the executor reads too
    FORMATS,
    UNSUPPORTED_FORMATS,
    ReasoningFormat,
    gate_tags,
)

# the variable that holds the reasoning of gen / select ``name`` (SGLang's name for it)
REASONING_SUFFIX = "_reasoning_content"


def reasoning_variable(name: str) -> str:
    """The variable that holds the reasoning split off variable ``name``."""
    return name + REASONING_SUFFIX


def reasoning_format_problem(model_type: object) -> str | None:
    """Why ``model_type`` (as the IR holds it: lower case) names no format here, or None."""
    if isinstance(model_type, str) and model_type in FORMATS:
        return None
    known = ", ".join(FORMATS)
    if isinstance(model_type, str) and model_type in UNSUPPORTED_FORMATS:
        return f"reasoning format {model_type!r} is not supported ({UNSUPPORTED_FORMATS[model_type]}); supported: {known}"
    return f"unknown reasoning format {model_type!r}; supported: {known}"


def split_reasoning(model_type: str, text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of ``text`` in format ``model_type`` (the module docstring's rules)."""
    return _split(FORMATS[model_type], text)


def gated_answer(model_type: str, text: str, forced: bool = False) -> str:
    """The part of ``text`` that a constraint gated by ``gate_tags(model_type, forced)`` covers:
    the answer ``split_reasoning`` gives (with ``forced``: the split of the text after a start
    tag). ``minimax-append-think`` does not split, and its answer is the whole output: the
    constraint covers what follows the end tag, stripped, as it does for ``minimax``."""
    fmt = FORMATS[model_type]
    if fmt.prepend_start or (forced and not fmt.forced):
        fmt = ReasoningFormat(fmt.start, fmt.end, forced=True)
    return _split(fmt, text)[1]


def _split(fmt: ReasoningFormat, text: str) -> tuple[str, str]:
    if fmt.prepend_start:
        return "", fmt.start + text
    if not fmt.forced and fmt.start not in text:
        return "", text
    body = text.replace(fmt.start, "").strip()
    reasoning, found, answer = body.partition(fmt.end)
    if not found:
        return body, ""
    return reasoning, answer.strip()


__all__ = [
    "FORMATS",
    "REASONING_SUFFIX",
    "UNSUPPORTED_FORMATS",
    "ReasoningFormat",
    "gate_tags",
    "gated_answer",
    "reasoning_format_problem",
    "reasoning_variable",
    "split_reasoning",
]
