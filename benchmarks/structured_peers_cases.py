"""The cases of ``bench_structured_peers.py``: JSONSchemaBench files, each test instance's expected
verdict from the oracle, its two serializations and their canonical token ids.

The oracle is the ``jsonschema`` validator of the schema's draft (2020-12 when it names none) with
format checks: jsonschema's own, plus the ones it takes from packages not installed here
(``EXTRA_FORMATS``: date-time and time as RFC 3339, uri / uri-reference as RFC 3986, iri /
iri-reference as those with any non-ASCII character allowed, hostname as RFC 1123 labels), held
by this checker only: installing the packages into .venv would change what the project's tests
check. Where the validator raises (a remote ``$ref``), the file's label is used.
"""

from __future__ import annotations

import calendar
import json
import random
import re
from pathlib import Path
from typing import Any

from llmir_lang.executor.constraints.testing import instance_texts

_DATE_TIME = re.compile(
    r"([0-9]{4})-(0[1-9]|1[0-2])-([0-9]{2})T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)
_PCT, _SUB = r"%[0-9A-Fa-f]{2}", r"!$&'()*+,;="
_PCHAR = rf"(?:[A-Za-z0-9\-._~{_SUB}:@]|{_PCT})"
_AUTH = rf"(?:(?:[A-Za-z0-9\-._~{_SUB}:]|{_PCT})*@)?(?:\[[0-9A-Fa-f:.vV]+\]|(?:[A-Za-z0-9\-._~{_SUB}]|{_PCT})*)(?::[0-9]*)?"
_TAIL = rf"(?:\?(?:{_PCHAR}|[/?])*)?(?:#(?:{_PCHAR}|[/?])*)?"
_URI = re.compile(
    rf"[A-Za-z][A-Za-z0-9+\-.]*:(?://{_AUTH}(?:/{_PCHAR}*)*|/(?:{_PCHAR}+(?:/{_PCHAR}*)*)?|{_PCHAR}+(?:/{_PCHAR}*)*|){_TAIL}"
)
_RELATIVE = re.compile(
    rf"(?://{_AUTH}(?:/{_PCHAR}*)*|/(?:{_PCHAR}+(?:/{_PCHAR}*)*)?"
    rf"|(?:[A-Za-z0-9\-._~{_SUB}@]|{_PCT})+(?:/{_PCHAR}*)*|){_TAIL}"
)
_HOST = re.compile(r"((?!-)[-A-Za-z0-9]{1,63}(?<!-)\.)*(?!-)[-A-Za-z0-9]{1,63}(?<!-)\.?")


def _date_time(s: object) -> bool:
    if not isinstance(s, str):
        return True
    m = _DATE_TIME.fullmatch(s.upper())
    return bool(m) and 1 <= int(m[3]) <= calendar.monthrange(int(m[1]), int(m[2]))[1]


def _ascii_only(check: Any) -> Any:  # the IRI forms: URI syntax with any non-ASCII character
    return lambda s: not isinstance(s, str) or check(re.sub(r"[^\x00-\x7f]", "a", s))


def _string(check: Any) -> Any:
    return lambda s: not isinstance(s, str) or check(s)


EXTRA_FORMATS = {
    "date-time": _date_time,
    "time": _string(lambda s: _date_time("1970-01-01T" + s)),
    "uri": _string(lambda s: bool(_URI.fullmatch(s))),
    "uri-reference": _string(lambda s: bool(_URI.fullmatch(s) or _RELATIVE.fullmatch(s))),
    "iri": _ascii_only(lambda s: bool(_URI.fullmatch(s))),
    "iri-reference": _ascii_only(lambda s: bool(_URI.fullmatch(s) or _RELATIVE.fullmatch(s))),
    "hostname": _string(lambda s: len(s.rstrip(".")) <= 253 and bool(_HOST.fullmatch(s))),
}


def oracle(schema: Any) -> Any:
    """The jsonschema validator of ``schema``'s draft with format checks (see module doc)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    checker = jsonschema.FormatChecker(formats=())
    checker.checkers = dict(cls.FORMAT_CHECKER.checkers)
    for fmt, fn in EXTRA_FORMATS.items():
        checker.checkers.setdefault(fmt, (fn, ()))
    return cls(schema, format_checker=checker)


def expected(validator: Any, test: dict[str, Any]) -> tuple[bool, str]:
    """(valid, source): the oracle's verdict, or the file's label where the validator raises."""
    try:
        return bool(validator.is_valid(test["data"])), "jsonschema"
    except Exception:
        return bool(test["valid"]), "label"


def load_cases(data: Path, limit: int | None, sample: int | None, seed: int, hf: Any) -> tuple[list, list]:
    """(cases, instances whose expected verdict differs from the label or came from it): the
    sorted files (a seeded ``sample`` of them first, if asked), the first ``limit``."""
    files = sorted(data.glob("*.json"))
    if sample is not None:
        files = sorted(random.Random(seed).sample(files, min(sample, len(files))))
    files = files[:limit]
    cases, disagreements = [], []
    for path in files:
        doc = json.loads(path.read_text())
        validator = oracle(doc["schema"])
        tests = []
        for i, t in enumerate(doc.get("tests", [])):
            valid, source = expected(validator, t)
            if valid != bool(t["valid"]) or source != "jsonschema":  # the latter: the label was used
                disagreements.append(
                    {"file": path.name, "test": i, "label": t["valid"], "used": valid, "source": source}
                )
            texts = instance_texts(t["data"])
            ids = [list(hf.encode(x, add_special_tokens=False)) for x in texts]
            tests.append({"valid": valid, "texts": texts, "ids": ids})
        cases.append({"file": path.name, "schema": doc["schema"], "tests": tests})
    return cases, disagreements
