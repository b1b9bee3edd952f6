"""Lowering: IR gen / select attributes to backend calls, and backend results back to values.

- ``gen_step(name, attrs)``: a ``GenStep`` with the engine's ``SamplingParams`` and, for a
  constrained gen, a ``ConstraintSpec`` built by the constraints package's helpers; inside
  ``separate_reasoning`` it covers the answer after the reasoning (``dsl.reasoning.gated_constraint``).
- ``chain_steps(segments)``: a ``gen.chain``'s segments as ``ChainRequest`` steps.
- ``prefill_request(text)``: an extend with no generation (one gen step of 0 tokens, since a chain
  needs a gen step), pinned: how the interpreter prefills a shared prefix once.
- ``decide_choice(method, logprobs)``: which choice a select picks from per-token logprobs, with
  the method's own meta keys; ``select_meta`` makes the select's meta info of it.
- ``unfinished_value`` / ``json_validator`` (``dsl/value_checks.py``, re-exported here): why a
  constrained gen that finished normally did not produce a complete value of its constraint.
- ``missing_next_alternatives(name, attrs, step)``: why a gen of ``max_tokens=0`` with
  ``top_logprobs_num`` fails: the backend did not report the next token's alternatives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmir_lang.dsl.reasoning import gated_constraint
from llmir_lang.dsl.sampling_args import to_sampling_params
from llmir_lang.dsl.value_checks import json_validator, unfinished_value
from llmir_lang.errors import NotYetSupportedError
from llmir_lang.executor.backend import ChainRequest, GenStep, StepResult
from llmir_lang.executor.choices import ChoiceDecision, select_choice
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.ir.attrs import CONSTRAINT_ATTRS, AttrValue, without_annotations


def gen_step(name: str | None, attrs: Mapping[str, AttrValue]) -> GenStep:
    """The backend step for one gen with IR attributes ``attrs`` (annotations are ignored). A
    constrained gen with a ``reasoning`` format gets its constraint after the reasoning
    (``dsl.reasoning.gated_constraint``)."""
    attrs = without_annotations(attrs)
    start = int(attrs.get("logprob_start_len", -1))  # an int: the verifier checks the attribute
    return GenStep(name, to_sampling_params(dict(attrs)), gated_constraint(attrs), start)


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


def decide_choice(
    method: str,
    logprobs: Sequence[Sequence[float]],
    unconditional: Sequence[Sequence[float | None]] | None = None,
) -> ChoiceDecision:
    """The choice ``method`` picks (``.index``; the first one on ties), over the choices' indices.

    ``token_length_normalized``, ``greedy_token_selection`` and ``unconditional_likelihood_normalized``
    are SGLang's three methods (``llmir_lang.executor.choices``; the third needs the choices' logprobs
    scored without the prompt), and the decision's ``meta`` holds the keys SGLang's method adds to
    the meta info; ``sum_logprob`` takes the highest total and adds none.
    """
    names = [str(i) for i in range(len(logprobs))]
    if method == "sum_logprob":
        keys = [sum(lps) for lps in logprobs]
        best = max(range(len(keys)), key=lambda i: (keys[i], -i))
        return ChoiceDecision(names[best], best, method, keys)
    return select_choice(method, names, logprobs, unconditional)


TokenText = Callable[[int], "str | None"]


def step_meta(
    step: StepResult, token_text: TokenText | None = None, attrs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The meta info a program reads with ``get_meta_info(name)`` for one generation.

    With ``return_logprob`` / ``top_logprobs_num`` it also carries SGLang's shapes:
    ``output_token_logprobs`` (one ``(logprob, token id, text)`` per generated token) and
    ``output_top_logprobs`` (per generated token, its most likely alternatives as such triples),
    and with a prompt's logprobs ``input_token_logprobs``; the text is the token's with
    ``return_text_in_logprobs`` (``token_text``), else None. ``matched_stop`` is what ended a
    ``"stop"`` (a stop string, a stop regex's pattern, a stop token's id; None otherwise or where
    the backend does not say: an OpenAI-compatible server that sends neither vLLM's
    ``stop_reason`` nor SGLang's ``matched_stop``). ``token_ids`` is None where the backend
    generated tokens but knows no ids (OpenAI's API).

    A gen that asked for logprobs (its ``attrs``) and generated nothing has ``logprobs`` and
    ``output_token_logprobs`` ``[]`` also where the backend gave none (OpenAI's API reports them
    per generated token: for ``max_tokens=0``, nothing), so the keys a program reads do not depend
    on the backend.
    """
    logprobs = step.logprobs
    if logprobs is None and attrs is not None and not step.token_ids and not step.text:
        if attrs.get("return_logprob") or attrs.get("top_logprobs_num"):
            logprobs = []
    meta = {
        "prompt_tokens": step.prompt_tokens,
        "completion_tokens": step.completion_tokens,
        "cached_tokens": step.cached_tokens,
        "finish_reason": step.finish_reason,
        "matched_stop": step.matched_stop,
        "logprobs": logprobs,
        # a backend that knows no ids (OpenAI's API) gave [] for tokens it did generate: None says
        # "not known" where [] would say "none generated"
        "token_ids": step.token_ids if step.token_ids or not step.completion_tokens else None,
    }

    def triples(pairs: Sequence[tuple[int | None, float | None]], texts: Sequence[str] | None) -> list[tuple]:
        # (logprob, id, text); the text with return_text_in_logprobs: the backend's where it gave
        # texts (OpenAI's API), else the id's decoded text
        if token_text is None:
            return [(lp, tid, None) for tid, lp in pairs]
        if texts is None or len(texts) != len(pairs):
            texts = [None] * len(pairs)
        return [
            (lp, tid, t if t is not None or tid is None else token_text(tid)) for (tid, lp), t in zip(pairs, texts)
        ]

    if logprobs is not None:
        # a backend that does not know the ids (OpenAI's API) gives None for them, never fewer triples
        n = len(logprobs)
        ids = step.token_ids if len(step.token_ids) == n else [None] * n
        meta["output_token_logprobs"] = triples(list(zip(ids, logprobs)), step.token_texts)
    if step.prompt_logprobs is not None:
        meta["input_token_logprobs"] = triples(step.prompt_logprobs, step.prompt_texts)
    if step.top_logprobs is not None:
        top_texts = step.top_texts or [None] * len(step.top_logprobs)
        meta["output_top_logprobs"] = [triples(top, tt) for top, tt in zip(step.top_logprobs, top_texts)]
    meta.update({k: v for k, v in step.meta.items() if k not in meta})
    return meta


# what SGLang's choices methods add to a select's meta info (``ChoicesDecision.meta_info``), each
# a list with one entry per choice: only the method that computes a key reports it
METHOD_META_KEYS = (
    "greedy_logprob_matrix",
    "unconditional_token_logprobs",
    "normalized_unconditional_prompt_logprobs",
)


def select_meta(
    choices: Sequence[str],
    logprobs: Sequence[Sequence[float]],
    picked: int,
    tokens: Sequence[Sequence[tuple[int, str | None]] | None] | None = None,
    given: Sequence[int] | None = None,
    method_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The meta info of a select: every choice's token logprobs and normalized score.

    Also under SGLang's names: ``normalized_prompt_logprobs`` (the mean token logprob of each
    choice), ``input_token_logprobs`` (per choice, one ``(logprob, token id, text)`` per token;
    ``tokens`` gives each choice's ``(id, text)`` pairs, None where the backend cannot tokenize,
    and then id and text are None) and ``output_token_logprobs`` (per choice, empty: a select
    generates no token).

    ``method_meta`` (the picking ``ChoiceDecision.meta``) adds the method's own keys
    (``METHOD_META_KEYS``, SGLang's shapes): ``greedy_logprob_matrix`` (per choice, its token
    logprobs padded to the longest choice with its own mean), ``unconditional_token_logprobs``
    (per choice, triples as ``input_token_logprobs``' of the same tokens, scored without the
    prompt) and ``normalized_unconditional_prompt_logprobs`` (per choice, the mean of conditional
    minus unconditional token logprobs).

    ``choices``, ``logprobs``, ``tokens``, ``picked`` and ``method_meta`` are over the distinct
    choices, as scored. ``given`` (the select's ``choices_given``: the program's choices with their
    repeats, as indices into ``choices``) lays every per-choice list out as the program gave the
    choices, so ``zip(choices, meta["normalized_prompt_logprobs"])`` pairs them as SGLang's do; a
    repeat gets the scores of its choice, and ``picked`` is the first index of the picked choice.
    """
    detail = {k: list(v) for k, v in (method_meta or {}).items() if k in METHOD_META_KEYS}
    if given is not None:
        choices = [choices[k] for k in given]
        logprobs = [logprobs[k] for k in given]
        tokens = None if tokens is None else [tokens[k] for k in given]
        detail = {key: [rows[k] for k in given] for key, rows in detail.items()}
        picked = list(given).index(picked)

    def triples(i: int, lps: Sequence[float | None]) -> list[tuple]:
        toks = tokens[i] if tokens is not None else None
        if toks is None or len(toks) != len(lps):
            toks = [(None, None)] * len(lps)
        return [(lp, tid, text) for lp, (tid, text) in zip(lps, toks)]

    normalized = [sum(lps) / max(len(lps), 1) for lps in logprobs]
    meta = {
        "choices": list(choices),
        "picked": picked,
        "logprobs": [list(lps) for lps in logprobs],
        "normalized_logprobs": normalized,
        "normalized_prompt_logprobs": list(normalized),  # its own list: a caller may change one
        "input_token_logprobs": [triples(i, lps) for i, lps in enumerate(logprobs)],
        "output_token_logprobs": [[] for _ in logprobs],
        "finish_reason": "select",
    }
    if "greedy_logprob_matrix" in detail:  # a repeat's row is its own list, as every other's
        meta["greedy_logprob_matrix"] = [list(row) for row in detail["greedy_logprob_matrix"]]
    if "unconditional_token_logprobs" in detail:
        rows = detail["unconditional_token_logprobs"]
        meta["unconditional_token_logprobs"] = [triples(i, lps) for i, lps in enumerate(rows)]
    if "normalized_unconditional_prompt_logprobs" in detail:
        meta["normalized_unconditional_prompt_logprobs"] = detail["normalized_unconditional_prompt_logprobs"]
    return meta


def missing_next_alternatives(
    name: str | None, attrs: Mapping[str, Any], step: StepResult, backend: str = "the backend"
) -> str | None:
    """Why gen ``name`` lacks what it asked for, or None. A gen of ``max_tokens=0`` with
    ``top_logprobs_num=k`` reports the k most likely next tokens as the one entry of
    ``output_top_logprobs`` (the embedded engine and SGLang do; SGLang's cot_decoding reads
    ``[0]``). A backend that reports none (OpenAI's API gives logprobs for generated tokens only)
    left the key out or empty, and the program read nothing: the gen fails instead, saying so."""
    k = attrs.get("top_logprobs_num")
    if not k or attrs.get("max_tokens") != 0 or (step.top_logprobs and step.top_logprobs[0]):
        return None
    return (
        f"gen({name!r}, max_tokens=0, top_logprobs_num={k}) asks for the {k} most likely next tokens "
        f"(output_top_logprobs[0] of its meta info), and {backend} reported none (OpenAI's API "
        "reports logprobs for generated tokens only; the embedded Runtime and SGLang report them); "
        f"generate one token instead, gen(..., max_tokens=1, top_logprobs_num={k}): its "
        "output_top_logprobs[0] holds the same alternatives"
    )


__all__ = [
    "chain_steps",
    "constraint_spec",
    "decide_choice",
    "gen_step",
    "json_validator",
    "missing_next_alternatives",
    "prefill_request",
    "select_meta",
    "step_meta",
    "unfinished_value",
]
