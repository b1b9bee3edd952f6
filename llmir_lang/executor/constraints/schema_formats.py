"""JSON-schema ``format``s for llguidance: which names it knows, and RFC 3339 dates and times.

``llguidance_knows_format`` asks llguidance itself whether it enforces a format name (the others
are annotations by the specification, and ``schema_rewrite`` drops them). ``DATETIME_PATTERNS``
are the ``date`` / ``time`` / ``date-time`` texts Python's ``datetime`` (so pydantic) reads, which
``schema_rewrite`` writes in place of those formats: llguidance's own regexes also admit year
0000, February 29 of every year (invalid RFC 3339) and second 60 (see the NOTE below).
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=256)
def llguidance_knows_format(name: str) -> bool:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "string", "format": name})
    return "Unknown format" not in llguidance.LLMatcher.validate_grammar(grammar)


_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # 0001-9999
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
RFC3339_DATE = (
    f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
# NOTE: second 60. RFC 3339's grammar allows a leap second (``time-second = 2DIGIT ; 00-58, 59,
# 60``), but the rule here is that the constraint never admits a value the validator of its path
# rejects, and both validators reject it: pydantic (``TypeAdapter(datetime.time)`` refuses
# "23:59:60Z", "second value is outside expected range"; ``datetime`` has no second 60), the
# path of a model class, and ``jsonschema``'s format checker, the path of a plain schema, whose
# ``time`` / ``date-time`` go through rfc3339-validator ("leap seconds are not supported"; without
# that package installed the two formats are not checked at all). So seconds are 00-59 for
# ``time`` and ``date-time`` alike. The texts below are exactly those rfc3339-validator accepts
# (``jsonschema`` upper-cases ``t`` / ``z`` first) and a subset of pydantic's: pydantic also reads
# times without an offset ("12:00"), which RFC 3339's ``full-time``, what the format names, lacks.
RFC3339_TIME = (
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
DATETIME_PATTERNS = {
    "date": f"^{RFC3339_DATE}$",
    "time": f"^{RFC3339_TIME}$",
    "date-time": f"^{RFC3339_DATE}[Tt]{RFC3339_TIME}$",
}
