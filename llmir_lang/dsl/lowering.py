"""Lowering: IR gen / select attributes to backend calls, and backend results back to values.

- ``gen_step(name, attrs)``: a ``GenStep`` with the engine's ``SamplingParams`` and, for a
  constrained gen, a ``ConstraintSpec`` built by the constraints package's helpers.
- ``chain_steps(segments)``: a ``gen.chain``'s segments as ``ChainRequest`` steps.
- ``prefill_request(text)``: an extend with no generation (one gen step of 0 tokens, since a chain
  needs a gen step), pinned: how the interpreter prefills a shared prefix once.
- ``pick_choice(method, logprobs)``: which choice a select picks from per-token logprobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmir_lang.dsl.primitives import to_sampling_params
from llmir_lang.errors import NotYetSupportedError
from llmir_lang.executor.backend import ChainRequest, GenStep, StepResult
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.ir.attrs import CONSTRAINT_ATTRS, AttrValue, without_annotations


def gen_step(name: str | None, attrs: Mapping[str, AttrValue]) -> GenStep:
    """The backend step for one gen with IR attributes ``attrs`` (annotations are ignored)."""
    attrs = without_annotations(attrs)
    return GenStep(name, to_sampling_params(dict(attrs)), constraint_spec(attrs))


def chain_steps(segments: Sequence[Mapping[str, AttrValue]]) -> list[GenStep | str]:
    """``gen.chain`` segments -> steps: a gen segment is a GenStep, a text segment its string."""
    steps: list[GenStep | str] = []
    for seg in segments:
        if "text" in seg:
            steps.append(str(seg["text"]))
        else:
            steps.append(gen_step(str(seg["gen"]), {k: v for k, v in seg.items() if k != "gen"}))
    return steps


def prefill_request(text: str) -> ChainRequest:
    """Prefill ``text`` once and keep it cached (pinned); generates nothing."""
    return ChainRequest(text, [GenStep(None, SamplingParams(max_new_tokens=0))], pin=True)


def constraint_spec(attrs: Mapping[str, AttrValue]) -> Any:
    """The ``ConstraintSpec`` for the (at most one) constraint in ``attrs``, or None.

    Built with ``llmir_lang.executor.constraints``' ``spec_from_*`` helpers; raises
    ``NotYetSupportedError`` while that package does not provide them.
    """
    given = [k for k in CONSTRAINT_ATTRS if k in attrs]
    if not given:
        return None
    key = given[0]
    value = attrs[key]
    try:
        from llmir_lang.executor import constraints
    except ImportError as e:
        raise NotYetSupportedError(
            f"gen({key}=...) needs structured generation, which this build does not have yet ({e}); "
            "remove the constraint or use select(...) for a fixed set of answers"
        ) from None
    helper = getattr(constraints, f"spec_from_{key}", None)
    if helper is None:
        raise NotYetSupportedError(
            f"gen({key}=...) is not yet supported: llmir_lang.executor.constraints has no spec_from_{key}; "
            "remove the constraint or use select(...) for a fixed set of answers"
        )
    return helper(list(value) if isinstance(value, tuple) else value)


def pick_choice(
    method: str,
    logprobs: Sequence[Sequence[float]],
    unconditional: Sequence[Sequence[float | None]] | None = None,
) -> int:
    """Index of the choice ``method`` picks (the first one on ties).

    ``token_length_normalized``, ``greedy_token_selection`` and ``unconditional_likelihood_normalized``
    are SGLang's three methods (``llmir_lang.executor.choices``; the third needs the choices' logprobs
    scored without the prompt); ``sum_logprob`` takes the highest total.
    """
    if method == "sum_logprob":
        keys = [sum(lps) for lps in logprobs]
        return max(range(len(keys)), key=lambda i: (keys[i], -i))
    from llmir_lang.executor import choices

    names = [str(i) for i in range(len(logprobs))]
    return choices.select_choice(method, names, logprobs, unconditional).index


def step_meta(step: StepResult) -> dict[str, Any]:
    """The meta info a program reads with ``get_meta_info(name)`` for one generation."""
    meta = {
        "prompt_tokens": step.prompt_tokens,
        "completion_tokens": step.completion_tokens,
        "cached_tokens": step.cached_tokens,
        "finish_reason": step.finish_reason,
        "logprobs": step.logprobs,
        "token_ids": step.token_ids,
    }
    meta.update({k: v for k, v in step.meta.items() if k not in meta})
    return meta


def select_meta(choices: Sequence[str], logprobs: Sequence[Sequence[float]], picked: int) -> dict[str, Any]:
    """The meta info of a select: every choice's token logprobs and normalized score."""
    return {
        "choices": list(choices),
        "picked": picked,
        "logprobs": [list(lps) for lps in logprobs],
        "normalized_logprobs": [sum(lps) / max(len(lps), 1) for lps in logprobs],
        "finish_reason": "select",
    }
