"""Jump-forward boundaries (``constraints/forced.py``) on the bundled model's tokenizer.

The bundled tokenizer splits letters, single digits, single whitespace and punctuation runs before
BPE, so a forced JSON key never merges with what follows, and forced punctuation merges only with
punctuation. The forced tokens along a gold record are therefore known exactly; the rule they
replace (always hold back the last forced token) committed one token less at every key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from llmir_lang.executor.constraints import ConstraintCompiler, TokenizerInfo, spec_from_json_schema
from llmir_lang.executor.constraints.forced import ForcedBoundary, forced_boundary
from llmir_lang.models.tiny_tasks import SCHEMAS

BUNDLED = Path(__file__).resolve().parents[3] / "llmir_lang" / "models" / "llmir-tiny"
ENGINES = ("outlines-core", "llguidance")

PERSON = {"name": "Ann Lee", "age": 19, "city": "Oslo", "occupation": "librarian", "married": True}
EVENT = {
    "title": "Jazz Fair",
    "city": "Rome",
    "date": "2030-12-19",
    "attendees": 12,
    "free": True,
    "organizer": "Bo Ek",
}


@pytest.fixture(scope="module")
def tiny_info() -> TokenizerInfo:
    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    return TokenizerInfo.from_hf(tok, vocab_size=4096, eos_token_ids=[0, 2])


def spell(info: TokenizerInfo, ids: list[int]) -> list[str]:
    return [(info.token_bytes[i] or b"").decode("utf-8", "replace") for i in ids]


def forced_along(info: TokenizerInfo, engine: str, kind: str, record: dict) -> dict[str, list[str]]:
    """Walk the canonical tokens of ``record``; at each position where something is forced, the
    forced tokens (keyed by the text before that position)."""
    compiled = ConstraintCompiler(info, engine=engine).compile(
        spec_from_json_schema(SCHEMAS[kind], whitespace="")
    )
    m = compiled.new_matcher()
    text = json.dumps(record, separators=(",", ":"))
    ids = info.encode(text)
    out: dict[str, list[str]] = {}
    for i, t in enumerate(ids):
        forced = m.forced_tokens()
        if forced:
            before = info.decode_bytes(ids[:i]).decode()
            out[before] = spell(info, forced)
            # forced tokens are a prefix of what the constraint allows and spell the forced text's start
            assert m.forced_text().encode().startswith(info.decode_bytes(forced))
        assert m.advance(t), (engine, spell(info, ids[: i + 1]))
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_keys_and_punctuation_are_forced_to_the_value(tiny_info, engine):
    got = forced_along(tiny_info, engine, "person", PERSON)
    head = '{"name":"Ann Lee","age":19,"city":"Oslo","'
    # before an integer, a boolean or an enum nothing can merge with '":' / '":"': committed with the key
    assert got['{"name":"Ann Lee","'] == ["age", '":']
    assert got[head] == ["occupation", '":"']
    assert got[head + 'occupation":"librarian'] == ['","', "married", '":']
    # the last field: the closing brace ends the output, nothing can follow it
    assert got[head + 'occupation":"librarian","married":true'] == ["}"]
    # before a free string '":"' stays with the model: a value starting with ':' would be
    # spelled '":' + '":' (see below), so committing '":"' could force a non-canonical spelling
    assert got['{"'] == ["name"]
    assert got['{"name":"Ann Lee","age":19,"'] == ["city"]
    # the rule replaced here (always hold back the last forced token) committed 10 tokens on this
    # walk; llguidance's own compute_ff_tokens commits 17, as this does
    assert sum(len(v) for v in got.values()) == 17


def test_event_schema_forced_tokens(tiny_info):
    got = forced_along(tiny_info, "llguidance", "event", EVENT)  # a pattern: outlines-core declines
    head = '{"title":"Jazz Fair","city":"Rome","'
    assert got[head] == ["date", '":"']  # a digit follows
    assert got[head + 'date":"2030'] == ["-"]
    assert got[head + 'date":"2030-12-19'] == ['","', "attendees", '":']
    assert got[head + 'date":"2030-12-19","attendees":12,"'] == ["free", '":']
    assert got[head + 'date":"2030-12-19","attendees":12,"free":true'] == [',"', "organizer"]


def test_real_merges_are_told_from_vocabulary_accidents(tiny_info):
    b = forced_boundary(tiny_info)
    assert isinstance(b, ForcedBoundary) and forced_boundary(tiny_info) is b  # built once
    colon_quote = tiny_info.encode('":"')
    assert spell(tiny_info, colon_quote) == ['":"']
    assert b.merges(b'":"', colon_quote, b":")  # '":":' is spelled '":' '":'
    assert not b.merges(b'":"', colon_quote, b',"')  # '":",' is spelled '":"' ',"'
    assert not b.merges(b'":"', colon_quote, b"}")
    assert not b.merges(b'":', tiny_info.encode('":'), b"1")  # digits are split off
    assert b'","' in {b'"' + p for p in b.extensions(b'"')}
    assert b.extensions(b'":"') == ()  # no longer token starts with it


def test_committable_holds_back_only_the_tokens_a_merge_reaches(tiny_info):
    b = forced_boundary(tiny_info)
    data = b'married":"'
    tokens = tiny_info.encode(data.decode())
    assert spell(tiny_info, tokens) == ["married", '":"']
    assert b.committable(data, tokens, lambda rest: True) == 1  # ':' may follow: '":"' waits
    assert b.committable(data, tokens, lambda rest: not rest.startswith(b":")) == 2
    assert b.committable(data, tokens, lambda rest: False) == 2  # nothing may follow


def test_straddling_token_in_a_toy_vocabulary():
    # vocabulary a, b, c, ab, bc; the "tokenizer" prefers bc over ab, as a BPE with that merge
    # order would: "ab" alone is [ab], but "abc" is [a, bc]
    vocab = [b"<eos>", b"a", b"b", b"c", b"ab", b"bc"]

    def encode(text: str) -> list[int]:
        if text.startswith("abc"):
            return [1, 5] + encode(text[3:])
        if text.startswith("ab"):
            return [4] + encode(text[2:])
        return [vocab.index(ch.encode()) for ch in text]

    info = TokenizerInfo(vocab, eos_token_ids=[0], encode=encode, special_ids=[0])
    b = ForcedBoundary(info)
    assert b.committable(b"ab", [4], lambda rest: rest == b"c") == 0  # [ab] would become [a, bc]
    assert b.committable(b"ab", [4], lambda rest: rest == b"a") == 1  # "aba" keeps [ab]
    assert b.committable(b"ab", [4], lambda rest: False) == 1
