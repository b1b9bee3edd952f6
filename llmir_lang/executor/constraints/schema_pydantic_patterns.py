"""The string patterns of the pydantic path (``schema_pydantic``): the texts a pydantic type
reads that a JSON-schema format alone does not pin down (naive / aware date-times and times,
durations, e-mail addresses, URLs, byte sizes, stripped strings, decimals of bounded digits), each
a regex the constraint generates within and pydantic accepts."""

from __future__ import annotations

import re

from llmir_lang.executor.constraints.schema_formats import RFC3339_DATE, RFC3339_TIME

_NAIVE_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
NAIVE_DATETIME_PATTERN = f"^{RFC3339_DATE}[Tt]{_NAIVE_TIME}$"
AWARE_DATETIME_PATTERN = f"^{RFC3339_DATE}[Tt]{RFC3339_TIME}$"
NAIVE_TIME_PATTERN = f"^{_NAIVE_TIME}$"
AWARE_TIME_PATTERN = f"^{RFC3339_TIME}$"


def _nonempty_sequence(parts: list[str]) -> str:
    """Regex of the parts in order, each optional, at least one present."""
    alts = [parts[i] + "".join(f"(?:{p})?" for p in parts[i + 1 :]) for i in range(len(parts))]
    return "(?:" + "|".join(alts) + ")"


# NOTE: timedelta's range. pydantic (speedate) refuses a duration past 999,999,999 days, and a
# time part (hours, minutes, seconds) whose seconds pass 2**32 ("a numeric value in the duration
# is too large": PT1193047H, PT9999999999S). The digit counts below keep every text far inside
# both: years 9999 * 365 + months 9999 * 30 + weeks 9999 * 7 + days 999999 < 5 million days, and
# 99999 h + 999999 min + 999999.999999999 s < 4.3e8 s. Fractions only on seconds, no sign.
_DURATION_DATE = _nonempty_sequence(["[0-9]{1,4}Y", "[0-9]{1,4}M", "[0-9]{1,4}W", "[0-9]{1,6}D"])
_DURATION_TIME = _nonempty_sequence(["[0-9]{1,5}H", "[0-9]{1,6}M", r"[0-9]{1,6}(?:\.[0-9]{1,9})?S"])
DURATION_PATTERN = f"^P(?:{_DURATION_DATE}(?:T{_DURATION_TIME})?|T{_DURATION_TIME})$"

_HEX = "[0-9a-fA-F]"

# Texts that str.strip() / pydantic's strip_whitespace leave as they are: no Unicode White_Space
# (what Rust's trim removes) at either end; anything between.
_NOT_SPACE = r"[^\t\n\x0B\f\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]"
STRIPPED_PATTERN = rf"^{_NOT_SPACE}(?:[\s\S]*{_NOT_SPACE})?$"


def _byte_size_pattern() -> str:
    """A decimal number and, optionally, one of ``ByteSize.byte_sizes``' units in any case
    (b, bit; k, kb, kbit, kib, kibit; likewise m, g, t, p, e)."""
    import pydantic

    units = sorted(pydantic.ByteSize.byte_sizes, key=lambda u: (-len(u), u))
    either = "|".join("".join(f"[{c.lower()}{c.upper()}]" for c in u) for u in units)
    return rf"^[0-9]{{1,12}}(?:\.[0-9]{{1,6}})? ?(?:{either})?$"


# Plain e-mail addresses that email-validator (pydantic's EmailStr, deliverability not checked)
# accepts: a dot-atom local part of at most 58 characters (limit 64), 2-4 host labels of at most
# 41 characters (limit 63) with at most one inner hyphen (so no "--", which reads as IDNA), and a
# top-level domain of 2-3 letters (a TLD ends with a letter; every special-use name it refuses,
# arpa / invalid / local / localhost / onion / test, has 4 or more), 188 characters at most
# (limit 254). Real addresses outside it (quoted local parts, .info, IP literals) are not generated.
_EMAIL_LOCAL = r"[A-Za-z0-9_+-]{1,24}(?:\.[A-Za-z0-9_+-]{1,16}){0,2}"
_EMAIL_LABEL = r"[A-Za-z0-9]{1,20}(?:-[A-Za-z0-9]{1,20})?"
EMAIL_PATTERN = f"^{_EMAIL_LOCAL}@(?:{_EMAIL_LABEL}\\.){{1,3}}[A-Za-z]{{2,3}}$"
_UUID_VERSION = re.compile(r"uuid([1-8])")

# Formats pydantic writes for types that read any string; every other format the engine does
# not know is refused on this path.
_ANY_STRING_FORMATS = frozenset({"password", "binary"})

# Simple URLs: lowercase host names whose last label starts with a letter (a numeric last label
# is read as an IPv4 address and refused unless it is one), a port below 10000, short path and
# query; every repetition bounded, so a text stays under HttpUrl's 2083 characters.
_LABEL = "[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?"
_URL_REST = (
    rf"(?:{_LABEL}\.){{0,4}}[a-z](?:[a-z0-9-]{{0,30}}[a-z0-9])?(?::[1-9][0-9]{{0,3}})?"
    r"(?:/[A-Za-z0-9._~-]{0,32}){0,8}(?:\?[A-Za-z0-9._~=&-]{0,64})?"
)


def _decimal_pattern(max_digits: int | None, places: int | None) -> str:
    """Plain decimal texts (no exponent, no leading zeros) with at most ``max_digits`` digits in
    all, ``places`` after the point and ``max_digits - places`` before it (pydantic checks all
    three); the lone ``0`` before a point counts as a digit, except where no whole digit is left."""
    if max_digits is None:
        frac = r"(?:\.[0-9]+)?" if places is None else (rf"(?:\.[0-9]{{1,{places}}})?" if places else "")
        return rf"^-?(?:0|[1-9][0-9]*){frac}$"
    alts = []
    for f in range(0, min(max_digits, max_digits - 1 if places is None else places) + 1):
        whole = max_digits - max(f, places or 0)
        int_part = "0" if whole < 1 else f"(?:0|[1-9][0-9]{{0,{whole - 1}}})"
        if f == 0 and whole >= 1:
            alts.append(int_part)
        elif f > 0:
            alts.append(rf"{int_part}\.[0-9]{{{f}}}")
    return "^-?(?:" + "|".join(alts) + ")$"
