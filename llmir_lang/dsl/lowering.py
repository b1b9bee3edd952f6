"""Lowering: IR gen / select attributes to backend calls, and backend results back to values.

- ``gen_step(name, attrs)``: a ``GenStep`` with the engine's ``SamplingParams`` and, for a
  constrained gen, a ``ConstraintSpec`` built by the constraints package's helpers; inside
  ``separate_reasoning`` it covers the answer after the reasoning (``dsl.reasoning.gated_constraint``).
- ``chain_steps(segments)``: a ``gen.chain``'s segments as ``ChainRequest`` steps.
- ``prefill_request(text)``: an extend with no generation (one gen step of 0 tokens, since a chain
  needs a gen step), pinned: how the interpreter prefills a shared prefix once.
- ``decide_choice(method, logprobs)``: which choice a select picks from per-token logprobs, with
  the method's own meta keys; ``select_meta`` makes the select's meta info of it.
- ``unfinished_value(name, attrs, text)``: why a constrained gen that finished normally did not
  produce a complete value of its constraint (a stop string cut it, or the engine was looser
  than the schema), so the gen fails instead of handing back invalid text as a finished value
  (of a gated constraint, the answer split off the output is checked).
- ``missing_next_alternatives(name, attrs, step)``: why a gen of ``max_tokens=0`` with
  ``top_logprobs_num`` fails: the backend did not report the next token's alternatives.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmir_lang.dsl.reasoning import gated_constraint
from llmir_lang.dsl.sampling_args import to_sampling_params
from llmir_lang.errors import NotYetSupportedError
from llmir_lang.executor.backend import ChainRequest, GenStep, StepResult
from llmir_lang.executor.choices import ChoiceDecision, select_choice
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.ir.attrs import CONSTRAINT_ATTRS, AttrValue, without_annotations
from llmir_lang.ir.reasoning import FORMATS, gated_answer


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


def unfinished_value(
    name: str | None, attrs: Mapping[str, AttrValue], text: str, matched: str | int | None = None
) -> str | None:
    """Why ``text``, the output of gen ``name`` that finished with ``finish_reason="stop"``, is not
    a complete value of its constraint; None when it is, when the gen has no constraint, or when
    the check cannot be made here.

    The engine ends a constrained generation at a ``stop`` string (or regex) or ``stop_token_ids`` token
    wherever it occurs, also inside the value (``stop=","`` cut a JSON object after its first
    member), and reports ``"stop"``: the text was a prefix of a match presented as a finished one.
    JSON must parse, and with a stop it must validate with ``jsonschema`` (the oracle ``get_obj``
    uses); ``choices`` are checked by membership, ``dtype`` by its regex, a ``regex`` or
    ``grammar`` by llguidance over the text's bytes. ``matched`` is what ended the gen (the
    backend's ``matched_stop``): one of the gen's own stops means a stop ended it, not the value's
    end; a backend that does not say (None) is taken to have stopped at one when the gen has any.
    """
    stops = [*_listed(attrs.get("stop")), *_listed(attrs.get("stop_regex")), *_listed(attrs.get("stop_token_ids"))]
    stopped = bool(stops) and (matched is None or matched in stops)
    fmt = attrs.get("reasoning")
    output, gated = text, False
    if fmt is not None and any(k in attrs for k in CONSTRAINT_ATTRS):
        try:
            gated = getattr(gated_constraint(attrs), "reasoning", None) is not None
        except Exception:  # the constraint did not build: the gen failed before it ran
            return None
        if gated:  # the constraint covered the answer only
            text = gated_answer(str(fmt), text)
    if "json_schema" in attrs:
        # Without a stop, only what is certain: the text must parse. jsonschema's own reading of a
        # schema differs from the engine's in corners (a float ``multipleOf``: 0.07 is not a
        # multiple of 0.01 to it), and a valid value must never fail the gen.
        why = _json_violation(str(attrs["json_schema"]), text, validate=stopped)
    elif "choices" in attrs:
        choices = [str(c) for c in attrs["choices"]]  # type: ignore[union-attr]
        why = None if text in choices else f"{_short(text)} is not one of the choices {choices!r}"
    elif "dtype" in attrs:
        from llmir_lang.executor.constraints import spec_from_dtype

        dtype = str(attrs["dtype"])
        why = None if re.fullmatch(spec_from_dtype(dtype).value, text) else f"{_short(text)} is not a {dtype}"
    elif "regex" in attrs or "grammar" in attrs:
        why = _grammar_violation(attrs, text)
    else:
        return None
    if why is None:
        return None
    if stopped:
        cause = (
            "a stop string, stop regex or stop token ended it inside the value (stops apply to constrained text "
            "too); drop stop= / stop_regex= / stop_token_ids= from a constrained gen: the constraint "
            "ends the value"
        )
    else:
        cause = _reasoning_cause(attrs, output, gated) or (
            "the constraint engine let through output its constraint rejects"
        )
    return f"gen({name!r}) finished, but not with a complete value: {why}; {cause}"


def _reasoning_cause(attrs: Mapping[str, AttrValue], output: str, gated: bool) -> str | None:
    """Why a reasoning model's output, ended by no stop, missed its constraint, where a server
    gated it otherwise than the gen says (a remote backend cannot always tell beforehand); None
    when nothing points to that. The embedded engine never gets here: a gated constraint masks
    EOS until the end tag, an ungated one covers the whole output."""
    if gated:
        fmt = FORMATS[str(attrs["reasoning"])]
        if fmt.end in output:
            return None
        return (
            f"the output holds no end tag {fmt.end!r}, so the constraint was applied to the whole output "
            "instead of the answer after the reasoning: the server does not gate constraints after a "
            "reasoning (SGLang and llmir do when started with --reasoning-parser "
            f"{attrs['reasoning']}; on vLLM, see its --reasoning-parser); start it so, or move the "
            "constrained gen out of separate_reasoning (its constraint then covers the whole output)"
        )
    spelled = " ".join(str(attrs[k]) for k in CONSTRAINT_ATTRS if k in attrs)
    tag = next((f.end for f in FORMATS.values() if f.end in output and f.end not in spelled), None)
    if tag is None:
        return None
    return (
        f"the output holds the reasoning end tag {tag!r}, which the constraint does not spell: the "
        "server may apply constraints only after a reasoning (SGLang and llmir do when started with "
        "--reasoning-parser), so the reasoning came unconstrained; put the gen inside "
        "separate_reasoning(..., model_type=<the server's parser>) (its value is then the answer), "
        "or start the server without --reasoning-parser"
    )


def _grammar_violation(attrs: Mapping[str, AttrValue], text: str) -> str | None:
    """A regex or lark grammar, matched byte by byte by llguidance (the engine's own matcher, so
    Rust regex syntax and the lark dialect read as they did when the gen was constrained)."""
    try:
        import llguidance

        from llmir_lang.executor.constraints.llguidance_backend import text_matches

        if "regex" in attrs:
            what = "the regex"
            grammar = llguidance.LLMatcher.grammar_from_regex(str(attrs["regex"]))
        else:
            what = "the grammar"
            if "<[" in str(attrs["grammar"]) or "max_tokens" in str(attrs["grammar"]):
                return None  # counts or names the model's tokens, which a byte-level check has not
            from llmir_lang.executor.constraints.lark_checks import engine_grammar

            # the text the engine enforced: a lark grammar as rewritten to mean what lark means
            grammar = llguidance.LLMatcher.grammar_from_lark(engine_grammar(str(attrs["grammar"])))
        matches = text_matches(grammar, text)
    except Exception:  # not checkable here (llguidance missing, a construct it cannot read)
        return None
    return None if matches is not False else f"{_short(text)} is not a complete match of {what}"


def _short(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _listed(value: object) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])


def _json_violation(schema_text: str, text: str, validate: bool) -> str | None:
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"{_short(text)} is not JSON ({e})"
    validator = json_validator(schema_text) if validate else None
    if validator is None:
        return None
    try:
        import jsonschema

        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except Exception:  # a pattern Python's re cannot read, a $ref it cannot resolve: not checkable
        return None
    if error is None:
        return None
    return f"{_short(text)} does not validate against its schema: {error.message} (at {error.json_path})"


@functools.lru_cache(maxsize=64)
def json_validator(schema_text: str) -> Any:
    """A jsonschema validator for the schema text, built once per schema (a batch of extractions
    validates every record against the same one); None when jsonschema cannot check it (then the
    engine's constraint is the only check).

    The draft is the schema's ``$schema``, else the first of 2020-12, 7 and 4 the schema is valid
    in (the engine takes them all: draft 7's tuple ``items: [...]``, draft 4's boolean
    ``exclusiveMaximum``). ``multipleOf`` is checked in decimal arithmetic: jsonschema divides
    floats, so 0.07 was not a multiple of 0.01 to it. A schema whose ``pattern`` Python's ``re``
    cannot read (``\\p{L}``, which the engine takes) is not checkable here: None."""
    try:
        import jsonschema

        schema = json.loads(schema_text)
        if isinstance(schema, dict) and "$schema" in schema:
            drafts = [jsonschema.validators.validator_for(schema)]
        else:
            drafts = [jsonschema.Draft202012Validator, jsonschema.Draft7Validator, jsonschema.Draft4Validator]
        for draft in drafts:
            try:
                draft.check_schema(schema)
            except jsonschema.SchemaError:
                continue
            cls = jsonschema.validators.extend(draft, {"multipleOf": _decimal_multiple_of})
            return cls(schema, format_checker=None)
        return None
    except Exception:
        return None


def _decimal_multiple_of(validator: Any, divisor: Any, instance: Any, schema: Any) -> Any:
    import decimal

    import jsonschema

    if not validator.is_type(instance, "number"):
        return
    try:
        failed = decimal.Decimal(repr(instance)) % decimal.Decimal(repr(divisor)) != 0
    except (decimal.InvalidOperation, ValueError):
        return
    if failed:
        yield jsonschema.ValidationError(f"{instance!r} is not a multiple of {divisor!r}")
