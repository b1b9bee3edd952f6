"""Checks of a finished gen's value against its constraint, made after the backend returned it.

- ``unfinished_value(name, attrs, text)``: why a constrained gen that finished normally did not
  produce a complete value of its constraint (a stop string cut it, or the engine was looser
  than the schema), so the gen fails instead of handing back invalid text as a finished value
  (of a gated constraint, the answer split off the output is checked).
- ``json_validator(schema_text)``: the ``jsonschema`` validator that check (and ``get_obj``) uses.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from llmir_lang.dsl.reasoning import gated_constraint
from llmir_lang.ir.attrs import CONSTRAINT_ATTRS, AttrValue
from llmir_lang.ir.reasoning import FORMATS, gated_answer


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
