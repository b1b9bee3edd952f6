"""Op attributes: typed values, their normal form, and the schema of every key.

An attribute value is one of ``str``, ``int``, ``float`` (finite or +-inf, never NaN), ``bool``, a
``tuple`` of attribute values (printed ``[a, b]``) or a ``dict`` from ``str`` to attribute values
(printed ``{k = v}``). ``normalize_attr`` turns lists into tuples, checks every leaf, and is applied
by the builder; the parser produces the same normal form, so printed and parsed programs compare
equal. Attribute dicts are treated as immutable: passes build new dicts, never mutate.

Keys are checked per op kind by the verifier against the schemas below. Constraints and sampling
parameters are strings and numbers only: the IR never evaluates them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from llmir_lang.errors import IRVerifyError

AttrValue = str | int | float | bool | tuple["AttrValue", ...] | dict[str, "AttrValue"]
Attrs = dict[str, AttrValue]

# Type specs: "str", "int", "float" (an int is accepted too), "bool", "str[]", "int[]", "dict[]",
# "dict", "any".
SAMPLING_ATTRS: dict[str, str] = {
    "max_tokens": "int",
    "min_tokens": "int",
    "stop": "str[]",
    "stop_token_ids": "int[]",
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "min_p": "float",
    "frequency_penalty": "float",
    "presence_penalty": "float",
    "repetition_penalty": "float",
    "seed": "int",
    "ignore_eos": "bool",
    "return_logprob": "bool",
    "top_logprobs_num": "int",
}

# IR sampling names -> executor SamplingParams field names (the IR uses the DSL's names).
SAMPLING_TO_ENGINE: dict[str, str] = {
    **{k: k for k in SAMPLING_ATTRS},
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
}

# At most one of these on a gen. Values are strings (choices: a list of strings), never evaluated.
CONSTRAINT_ATTRS: dict[str, str] = {
    "regex": "str",
    "json_schema": "str",
    "choices": "str[]",
    "grammar": "str",
    "dtype": "str",
}
DTYPES = ("int", "float", "bool", "str")

# Annotations the optimizer passes add (see each pass's docstring for what the interpreter does).
ANNOTATION_ATTRS: dict[str, str] = {
    "pin": "str",  # prefix-share: this op's result is shared prefix node <pin>
    "pin_users": "int",  # prefix-share: how many extending ops consume the node, module-wide
    "group": "str",  # fork-join: on a fork, the id of its branch group
    "branch_of": "str",  # fork-join: on the first op of a branch, the group it belongs to
}

GEN_ATTRS: dict[str, str] = {**SAMPLING_ATTRS, **CONSTRAINT_ATTRS}
SELECT_ATTRS: dict[str, str] = {
    "choices": "str[]",
    "choices_method": "str",
    "trie": "dict[]",  # select-trie: [{parent = int, text = str}, ...]
    "trie_ends": "int[]",  # select-trie: trie node where each choice ends
    "score": "str",  # select-trie: "batched" = all choices in one extend
}
JOIN_ATTRS: dict[str, str] = {"mode": "str"}
JOIN_MODES = ("gather", "concat")
GEN_CHAIN_ATTRS: dict[str, str] = {"segments": "dict[]"}


def normalize_attr(value: object, where: str = "attribute") -> AttrValue:
    """Return ``value`` in attribute normal form, or raise ``IRVerifyError`` saying why not."""
    if isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            raise IRVerifyError(f"{where}: NaN is not a valid attribute value; use a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return tuple(normalize_attr(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Mapping):
        out: dict[str, AttrValue] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise IRVerifyError(f"{where}: dict keys must be non-empty strings, got {k!r}")
            out[k] = normalize_attr(v, f"{where}.{k}")
        return out
    raise IRVerifyError(
        f"{where}: {type(value).__name__} {value!r} is not an attribute value; "
        "use str, int, float, bool, list or dict (omit a key instead of passing None)"
    )


def normalize_attrs(attrs: Mapping[str, object], schema: Mapping[str, str] | None = None) -> Attrs:
    """Normalize a whole attribute dict.

    With ``schema``: an int given for a float key becomes a float, and one string given for a
    list-of-strings key (``stop="\\n"``) becomes a one-element list.
    """
    out = normalize_attr(dict(attrs), "attributes")
    assert isinstance(out, dict)
    if schema is not None:
        for k, v in out.items():
            if schema.get(k) == "float" and isinstance(v, int) and not isinstance(v, bool):
                out[k] = float(v)
            elif schema.get(k) == "str[]" and isinstance(v, str):
                out[k] = (v,)
    return out


def check_type(value: AttrValue, spec: str) -> bool:
    """True if ``value`` matches the type ``spec`` (see the module docstring)."""
    if spec == "any":
        return True
    if spec == "bool":
        return isinstance(value, bool)
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec == "str":
        return isinstance(value, str)
    if spec == "dict":
        return isinstance(value, dict)
    if spec.endswith("[]"):
        return isinstance(value, tuple) and all(check_type(v, spec[:-2]) for v in value)
    raise ValueError(f"unknown attribute type spec {spec!r}")


def annotations_of(attrs: Mapping[str, AttrValue]) -> Attrs:
    """The optimizer annotations among ``attrs`` (keys of ``ANNOTATION_ATTRS``)."""
    return {k: v for k, v in attrs.items() if k in ANNOTATION_ATTRS}


def without_annotations(attrs: Mapping[str, AttrValue]) -> Attrs:
    """``attrs`` without the optimizer annotations."""
    return {k: v for k, v in attrs.items() if k not in ANNOTATION_ATTRS}
