"""The forcing guard across the model's special tokens, and its bound on forced text.

- A grammar that names the model's tokens (``<[id]>``, ``<|special_id|>``) keeps its guard: the
  guard's copy takes a special token as the matcher does (it had none where the id was past 256
  or named, and dropped it after one below), so a grammar that hangs after a special token ends
  its request instead. llguidance's forced-bytes loop walks through a special token that is the
  only thing allowed; so does the guard.
- ``forcing_guard.MAX_FORCED_BYTES`` bounds the forced text walked: a grammar that forces more
  than the bound ends with an error that says how to raise it, and runs once it is raised.

Grammars that hang run in a child process with a timeout (``_run_child``), so that a regression
fails instead of hanging the test run.
"""

from __future__ import annotations

import json

import pytest
from test_grammar_limits import _run_child

from llmir_lang.errors import ConstraintError
from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    TokenizerInfo,
    allocate_bitmask,
    fill_batch_bitmask,
    forcing_guard,
    spec_from_grammar,
)

SPECIAL = 2000  # an added special token past the 2,000 ids of the test tokenizer

# (grammar, the tokens taken before the mask that hangs: a string is its bytes, an int a token)
HANGING = {
    # the swallowing terminal after a special token: the guard was dropped at the token
    "after a special token below 256": ('start: "x" <[1]> "y" A "c"\nA: /[ab]c+/\n', ["x", 1, "y", "a"]),
    # no guard at all: the byte-level copy could not read a token id past its 257 tokens
    "after a special token past 256": (
        f'start: "x" <[{SPECIAL}]> "y" A "c"\nA: /[ab]c+/\n',
        ["x", SPECIAL, "y", "a"],
    ),
    "after a special token by name": (
        f'start: "x" <|special_{SPECIAL}|> "y" A "c"\nA: /[ab]c+/\n',
        ["x", SPECIAL, "y", "a"],
    ),
    # llguidance forces the special token, then the terminal's text, without end
    "through a forced special token": (f'start: ("x" | "z") <[{SPECIAL}]> A "c"\nA: /ac+/\n', ["x"]),
}

_CHILD = """
import json, time
from llmir_lang.executor.constraints import (
    ConstraintCompiler, TokenizerInfo, allocate_bitmask, fill_batch_bitmask, spec_from_grammar)
from llmir_lang.executor.constraints.testing import train_test_tokenizer

base = TokenizerInfo.from_hf(train_test_tokenizer("sentencepiece_bpe", 2000, 2_000_000))
special = %d
info = TokenizerInfo(
    list(base.token_bytes) + [None], base.eos_token_ids, encode=base.encode,
    special_ids=[*base.special_ids, special])
compiler = ConstraintCompiler(info, outlines_isolation="inline")
out = {}
for name, (grammar, prefix) in json.loads(%r).items():
    m = compiler.compile(spec_from_grammar(grammar)).new_matcher()
    for piece in prefix:
        ids = [piece] if isinstance(piece, int) else [info.token_bytes.index(bytes([b])) for b in piece.encode()]
        for t in ids:
            assert m.advance(t), (name, t)
    mask = allocate_bitmask(1, info.vocab_size)
    start = time.perf_counter()
    dead = fill_batch_bitmask([m], mask)
    out[name] = {"seconds": time.perf_counter() - start, "dead": dead, "error": m.error(),
                 "limit": m.over_budget(), "guarded": m._guard is not None}
print(json.dumps(out))
"""


def test_a_grammar_that_hangs_after_a_special_token_ends_its_request():
    out = _run_child(_CHILD % (SPECIAL, json.dumps(HANGING)))
    for name in HANGING:
        got = out[name]
        assert got["guarded"], (name, got)
        assert got["dead"] == [0] and got["limit"] == "forced text", (name, got)
        assert "never ends" in got["error"] and got["seconds"] < 5.0, (name, got)


@pytest.fixture(scope="module")
def special_info(sp_info) -> TokenizerInfo:
    """The test tokenizer with a special token added at id ``SPECIAL``."""
    return TokenizerInfo(
        list(sp_info.token_bytes) + [None],
        sp_info.eos_token_ids,
        encode=sp_info.encode,
        special_ids=[*sp_info.special_ids, SPECIAL],
    )


def _ids(info: TokenizerInfo, text: str) -> list[int]:
    return [info.token_bytes.index(bytes([b])) for b in text.encode()]


@pytest.mark.parametrize("special", [f"<[{SPECIAL}]>", f"<|special_{SPECIAL}|>"])
def test_the_guard_follows_a_special_token_and_walks_through_a_forced_one(special_info, special):
    compiled = ConstraintCompiler(special_info).compile(
        spec_from_grammar(f'start: ("x" | "z") {special} "yz" ("a" | "b") "end"\n')
    )
    m = compiled.new_matcher()
    mask = allocate_bitmask(1, special_info.vocab_size)
    assert m.advance(_ids(special_info, "x")[0])
    # the special token and "yz" are forced: the walk stops at the choice, where llguidance does
    assert fill_batch_bitmask([m], mask) == [] and m._guard.safe_until == m._guard.read + len(b"\xff[2000]yz")
    assert m.forced_tokens()[0] == SPECIAL
    assert m.advance(SPECIAL) and m._guard is not None
    for t in _ids(special_info, "yza"):
        assert fill_batch_bitmask([m], mask) == [] and m.advance(t)
    assert m._guard is not None and m._guard.read == 1 + len(b"\xff[2000]yza")
    # rolled back across the special token and taken again: the copy stays in step
    m.rollback(4)
    assert fill_batch_bitmask([m], mask) == [] and m.advance(SPECIAL)
    assert m._guard.read == 1 + len(b"\xff[2000]")
    for t in _ids(special_info, "yzaend"):
        assert fill_batch_bitmask([m], mask) == [] and m.advance(t), t
    assert m.is_accepting() and m.error() is None and m._guard is not None


def test_a_grammar_without_the_model_s_tokens_keeps_the_byte_vocabulary(special_info):
    layout = forcing_guard.guard_layout(special_info, 'start: "x" A\nA: /[ab]+/\n')
    assert not layout.model_ids and layout.tokenizer.vocab_size == 257
    assert forcing_guard.guard_layout(special_info, 'start: "x" <[5]>\n').model_ids


LITERAL = "0123456789" * 10  # 100 bytes forced after the choice


@pytest.fixture()
def bound(monkeypatch):
    def set_bound(n) -> None:
        monkeypatch.setattr(forcing_guard, "MAX_FORCED_BYTES", n)

    return set_bound


def test_forced_text_past_the_bound_ends_saying_how_to_raise_it(sp_info, bound):
    compiled = ConstraintCompiler(sp_info).compile(spec_from_grammar(f'start: ("a" | "b") "{LITERAL}" "!"\n'))
    mask = allocate_bitmask(1, sp_info.vocab_size)
    bound(64)
    m = compiled.new_matcher()
    assert m.advance(_ids(sp_info, "a")[0])
    assert fill_batch_bitmask([m], mask) == [0] and m.over_budget() == "forced text"
    assert "more than 64 bytes" in m.error() and "forcing_guard.MAX_FORCED_BYTES" in m.error()
    bound(128)  # a request's matcher made since walks the whole text
    m = compiled.new_matcher()
    assert m.advance(_ids(sp_info, "a")[0])
    assert fill_batch_bitmask([m], mask) == [] and m.error() is None
    assert m.forced_text() == LITERAL + "!"


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "64"])
def test_a_bad_bound_is_refused_when_a_matcher_is_made(sp_info, bound, value):
    compiled = ConstraintCompiler(sp_info).compile(spec_from_grammar('start: ("a" | "b") "c"\n'))
    bound(value)
    with pytest.raises(ConstraintError, match=r"MAX_FORCED_BYTES must be an int >= 1"):
        compiled.new_matcher()
