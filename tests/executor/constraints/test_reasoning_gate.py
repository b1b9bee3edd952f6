"""The reasoning gate (``reasoning_gate.py``): a constraint that starts after a reasoning model's
end tag. Over a hand-made vocabulary whose tokens cut the tags every way (a tag over several
tokens, a token ending the tag and beginning the answer) and over the bundled model's tokenizer
(no ``</think>`` token), on both constraint engines: the mask agrees with ``advance``, EOS only
where accepting, nothing forced before the tag, rollback across the gate re-closes it, and the
text the constraint took is exactly the answer ``split_reasoning`` splits off."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    ReasoningTags,
    TokenizerInfo,
    allocate_bitmask,
    gated_by_reasoning,
    spec_from_choices,
    spec_from_json_schema,
    spec_from_regex,
)
from llmir_lang.executor.constraints.reasoning_scan import WHITESPACE
from llmir_lang.ir.reasoning import gate_tags, gated_answer

# tokens that cut <think>, </think> and kimi's ◁think▷ / ◁/think▷ every way, whitespace runs, and
# tokens that end the tag and begin the answer; every byte is a token of its own too
PIECES = [
    "<think>", "</think>", "</", "think", "think>", "k>", "k>{", ">{", ">\n", "\n\n", " {", "\n{",
    "</think>\n\n{", "th", "in", "<th", "ink>", '{"', '":', "12", "ab", "  ", '>\n\n{"', "42", "k> 4",
    "k>4", "k>x", "\u25c1think\u25b7", "\u25c1/think\u25b7", "\u25b7", "\u25b7 {", "hm", " a",
    "\n<think>", "\u25c1", "\u25c1/",
]  # fmt: skip
CHARS = ["<", "/", ">", "\n", " ", "{", "}", '"', "a", "4", "x", ":", "\t"]  # their byte tokens
EOS, SPECIAL = 0, 1
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}},
    "required": ["a"],
    "additionalProperties": False,
}
CONSTRAINTS = {
    "digits": (spec_from_regex(r"\d+"), lambda t: re.fullmatch(r"\d+", t) is not None),
    "word": (spec_from_regex("[a-z]{1,3}"), lambda t: re.fullmatch("[a-z]{1,3}", t) is not None),
    "json": (spec_from_json_schema(SCHEMA), lambda t: _is_record(t)),
    "choice": (spec_from_choices(["yes", "no"]), lambda t: t in ("yes", "no")),
}
FORMATS = ["deepseek-r1", "qwen3", "kimi"]  # forced <think>, unforced <think>, unforced ◁think▷


def _is_record(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["a"] and type(value["a"]) is int


def _info() -> TokenizerInfo:
    token_bytes = [None, None] + [bytes([b]) for b in range(256)] + [p.encode() for p in PIECES]
    return TokenizerInfo(token_bytes, eos_token_ids=[EOS], special_ids=[SPECIAL])


INFO = _info()
IDS = {chr(b): 2 + b for b in range(128)} | {p: 258 + i for i, p in enumerate(PIECES)}
COMPILERS = {
    e: ConstraintCompiler(INFO, outlines_isolation="inline", engine=e)
    for e in ("llguidance", "outlines-core")
}


def _gated(engine: str, constraint: str, fmt: str, forced: bool = False):
    spec = gated_by_reasoning(CONSTRAINTS[constraint][0], ReasoningTags(*gate_tags(fmt, forced)))
    return COMPILERS[engine].compile(spec)


def _bit(m, token: int) -> bool:
    mask = allocate_bitmask(1, INFO.vocab_size)
    m.fill_bitmask(mask, 0)
    return bool((int(mask[0, token // 32]) >> (token % 32)) & 1)


def _row(m) -> list[int]:
    mask = allocate_bitmask(1, INFO.vocab_size)
    m.fill_bitmask(mask, 0)
    return mask[0].tolist()


def _walk(m, pieces: list[str]) -> None:
    """Advance through ``pieces`` (each a token of PIECES), each allowed by the mask."""
    for p in pieces:
        assert _bit(m, IDS[p]), f"{p!r} masked {m.phase}"
        assert m.advance(IDS[p]), p


def _text(ids: list[int]) -> str:
    return INFO.decode_bytes(ids).decode("utf-8", errors="replace")


# --- one case at a time ------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["llguidance", "outlines-core"])
def test_tag_over_several_tokens_then_json_after_blank_lines(engine):
    m = _gated(engine, "json", "deepseek-r1").new_matcher()
    for p in ["hm", "</", "th", "in", "k"]:
        assert m.forced_tokens() == [] and m.forced_text() == "" and not m.is_accepting()
        assert not _bit(m, EOS) and not m.is_terminated()  # EOS waits for the end tag
        _walk(m, [p])
    assert m.phase == "inside the reasoning"
    _walk(m, [">", "\n\n", "\n"])
    assert m.phase == "after the end tag" and m.forced_text() == "{"  # the answer's own
    _walk(m, ['{"', "a", '":', "42", "}"])
    assert m.is_accepting() and _bit(m, EOS) and m.advance(EOS) and m.is_terminated()


@pytest.mark.parametrize("engine", ["llguidance", "outlines-core"])
def test_a_token_that_ends_the_tag_and_begins_the_answer(engine):
    json_gate = _gated(engine, "json", "deepseek-r1")
    digits = _gated(engine, "digits", "deepseek-r1")
    m = json_gate.new_matcher()
    _walk(m, ["</", "th", "in"])
    assert _bit(m, IDS["k>{"]) and not _bit(m, IDS["k>4"])  # the answer's first byte decides
    assert not m.advance(IDS["k>4"]) and m.phase == "inside the reasoning"  # refused: unchanged
    _walk(m, ["k>{"])
    assert m.phase == "in the answer" and m.forced_text() in ('"a":', "")  # "{ " may follow
    m = digits.new_matcher()
    _walk(m, ["</", "th", "in"])
    assert _bit(m, IDS["k>4"]) and _bit(m, IDS["k> 4"]) and not _bit(m, IDS["k>x"])
    _walk(m, ["k> 4"])  # the whitespace after the tag goes; "4" is the answer
    assert m.is_accepting()
    m = json_gate.new_matcher()
    _walk(m, ["</think>\n\n{"])  # the whole tag, blank lines and the answer's "{" in one token
    assert m.phase == "in the answer"
    _walk(m, ['"', "a", '":', "4", "}"])
    assert m.is_accepting()


@pytest.mark.parametrize("engine", ["llguidance", "outlines-core"])
def test_whitespace_after_the_tag_alone_or_with_the_answer(engine):
    m = _gated(engine, "json", "deepseek-r1").new_matcher()
    _walk(m, ["</think>"])
    assert _bit(m, IDS["\n\n"]) and _bit(m, IDS[" {"]) and _bit(m, IDS["\n{"]) and not _bit(m, IDS[" a"])
    assert not _bit(m, EOS)  # the schema needs a value
    _walk(m, ["\n\n", " {"])
    assert m.phase == "in the answer"
    assert not _bit(m, IDS["\n\n"])  # the schema's own whitespace now: one space at most


@pytest.mark.parametrize("engine", ["llguidance", "outlines-core"])
def test_rollback_across_the_end_tag_closes_the_gate_again(engine):
    g = _gated(engine, "digits", "deepseek-r1")
    m = g.new_matcher()
    _walk(m, ["hm", "</", "th", "in", "k>4", "2"])
    assert m.is_accepting() and m.phase == "in the answer"
    m.rollback(2)  # the token that ended the tag and began the answer, and the one after
    assert m.phase == "inside the reasoning" and not m.is_accepting() and m.forced_tokens() == []
    assert not _bit(m, EOS) and not _bit(m, IDS["k>x"]) and _bit(m, IDS["k>4"])
    again = g.new_matcher()
    _walk(again, ["hm", "</", "th", "in"])
    assert _row(m) == _row(again)  # as if the rolled-back tokens never came
    _walk(m, ["k", ">", "\n", "12"])
    assert m.is_accepting()
    m.rollback(8)
    assert _row(m) == _row(g.new_matcher()) and m.phase == "inside the reasoning"
    with pytest.raises(Exception, match="cannot roll back 1"):
        m.rollback(1)


@pytest.mark.parametrize("engine", ["llguidance", "outlines-core"])
def test_unforced_format_without_start_tag_constrains_the_whole_output(engine):
    """qwen3 writes its own ``<think>``: an output that does not begin with it is all answer to
    the split, untouched, so the constraint covers it from its first byte."""
    g = _gated(engine, "digits", "qwen3")
    m = g.new_matcher()
    assert _bit(m, IDS["4"]) and not _bit(m, IDS["x"]) and _bit(m, IDS["<th"]) and _bit(m, IDS["\n"])
    assert not m.is_accepting() and not _bit(m, EOS)
    _walk(m, ["42"])
    assert m.phase == "in the answer" and m.is_accepting()
    m = g.new_matcher()
    _walk(m, ["\n"])  # whitespace may still lead to <think>...
    assert _bit(m, IDS["<think>"]) and not _bit(m, IDS["4"])  # ...but "\n4" is no match of \d+
    _walk(m, ["<th", "ink>", "hm", "</think>", "4"])
    assert m.is_accepting()
    m = g.new_matcher()
    _walk(m, ["<"])
    assert not _bit(m, IDS["x"]) and _bit(m, IDS["th"])
    # enable_thinking: the output begins inside the reasoning
    forced = _gated(engine, "digits", "qwen3", forced=True).new_matcher()
    assert not _bit(forced, IDS["4"]) or forced.phase == "inside the reasoning"
    _walk(forced, ["4", "</think>", "4"])
    assert forced.is_accepting()


def test_a_constraint_that_spells_the_end_tag_covers_the_whole_output():
    tags = ReasoningTags("<think>", "</think>", True)
    whole = spec_from_regex(r"<think>[a-z ]{1,8}</think> ?[a-z]{1,5}")
    assert gated_by_reasoning(whole, tags) is whole
    assert gated_by_reasoning(spec_from_regex(r"<think>x<\/think>y"), tags).reasoning is None
    assert gated_by_reasoning(spec_from_choices(["<think>x</think>y", "z"]), tags).reasoning is None
    gated = gated_by_reasoning(spec_from_regex(r"\d+"), tags)
    assert gated.reasoning == tags and gated.describe() == "regex('\\\\d+') after '</think>'"
    assert gated != spec_from_regex(r"\d+") and hash(gated) != hash(spec_from_regex(r"\d+"))


def test_the_gate_compiles_once_and_keeps_the_inner_engine_and_errors():
    from llmir_lang.executor.constraints import InvalidRegexError

    c = ConstraintCompiler(INFO, outlines_isolation="inline")
    tags = ReasoningTags("<think>", "</think>", True)
    a = c.compile(gated_by_reasoning(spec_from_regex(r"\d+"), tags))
    assert c.compile(gated_by_reasoning(spec_from_regex(r"\d+"), tags)) is a
    assert a.engine == c.compile(spec_from_regex(r"\d+")).engine == a.meta.engine
    with pytest.raises(InvalidRegexError):
        c.compile(gated_by_reasoning(spec_from_regex(r"(\d"), tags))


def test_the_bundled_tokenizer_has_no_end_tag_token_and_the_gate_still_opens():
    from tokenizers import Tokenizer

    tok_dir = Path(__file__).resolve().parents[3] / "llmir_lang" / "models" / "llmir-tiny"
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    info = TokenizerInfo.from_hf(tok, eos_token_ids=[0, 2])
    c = ConstraintCompiler(info, outlines_isolation="inline")
    text = 'hm, 2 + 2?</think>\n\n{"a":4}'
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(tok.encode("</think>", add_special_tokens=False).ids) > 1
    for engine in ("llguidance", "outlines-core"):
        c = ConstraintCompiler(info, outlines_isolation="inline", engine=engine)
        m = c.compile(
            gated_by_reasoning(spec_from_json_schema(SCHEMA), ReasoningTags(*gate_tags("deepseek-r1")))
        ).new_matcher()
        mask = allocate_bitmask(1, info.vocab_size)
        for tid in ids:
            m.fill_bitmask(mask, 0)
            assert (int(mask[0, tid // 32]) >> (tid % 32)) & 1 and m.advance(tid)
        assert m.is_accepting()


# --- any walk ------------------------------------------------------------------------------------
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("piece"), st.sampled_from(PIECES + CHARS)),
        st.tuples(st.just("allowed"), st.integers(0, 10**6)),
        st.tuples(st.just("any"), st.integers(0, 256 + len(PIECES) + 1)),
        st.tuples(st.just("rollback"), st.integers(0, 6)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["llguidance", "outlines-core"]),
    st.sampled_from(sorted(CONSTRAINTS)),
    st.sampled_from(FORMATS),
    ACTIONS,
)
def test_any_walk_keeps_the_protocol_and_constrains_exactly_the_split_answer(
    engine, constraint, fmt, actions
):
    """At every step: a set bit is a token ``advance`` takes; the EOS bit is set exactly where
    ``is_accepting()``; nothing is forced before the end tag; where the output may end, the answer
    ``split_reasoning`` gives is a complete match of the constraint; after a rollback the matcher
    is the one a fresh walk over the remaining tokens makes."""
    compiled = _gated(engine, constraint, fmt)
    full_match = CONSTRAINTS[constraint][1]
    m = compiled.new_matcher()
    ids: list[int] = []
    end = gate_tags(fmt)[1]
    for kind, arg in actions:
        if m.is_terminated():
            break
        row = _row(m)
        allowed = [t for t in range(INFO.vocab_size) if (row[t // 32] >> (t % 32)) & 1]
        eos_bit = EOS in allowed
        assert eos_bit == m.is_accepting(), (m.phase, _text(ids))
        if m.phase in ("before the start tag", "inside the reasoning"):
            assert m.forced_tokens() == [] and m.forced_text() == ""
            assert end not in _text(ids).replace(gate_tags(fmt)[0], "")
        if eos_bit:
            answer = gated_answer(fmt, _text(ids))
            assert full_match(answer), (_text(ids), answer)
        if kind == "rollback":
            k = min(arg, len(ids))
            m.rollback(k)
            del ids[len(ids) - k :]
            fresh = compiled.new_matcher()
            assert all(fresh.advance(t) for t in ids)
            assert (_row(fresh), fresh.is_accepting(), fresh.phase) == (_row(m), m.is_accepting(), m.phase)
            continue
        if kind == "piece":
            token = IDS[arg]
        elif kind == "allowed":
            if not allowed:
                break
            token = allowed[arg % len(allowed)]
        else:
            token = arg
        bit = token in allowed
        taken = m.advance(token)
        if bit:
            assert taken, (token, INFO.token_bytes[token], m.phase, _text(ids))
        if taken:
            ids.append(token)
            if token == EOS:
                assert full_match(gated_answer(fmt, _text(ids[:-1])))
    if any(t == EOS for t in ids):
        assert m.is_terminated()


def test_whitespace_set_is_what_str_strip_removes_among_ascii():
    assert bytes(c for c in range(128) if chr(c).isspace()) == bytes(sorted(WHITESPACE))


# --- review fixes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["llguidance", "outlines-core"])
def test_a_constraint_that_begins_with_whitespace_is_refused_after_the_reasoning(engine):
    """The answer is stripped, so `choices=[" yes", " no"]` could never start after the end tag:
    the model wrote whitespace up to max_tokens, with no error. It is refused when compiled."""
    from llmir_lang.executor.constraints import UnsatisfiableConstraintError

    for spec in (spec_from_choices([" yes", " no"]), spec_from_regex(r"\n\d+")):
        gated = gated_by_reasoning(spec, ReasoningTags(*gate_tags("deepseek-r1")))
        with pytest.raises(UnsatisfiableConstraintError, match="stripped of leading whitespace"):
            COMPILERS[engine].compile(gated)
    # one choice without the whitespace is enough: the split answer can be it
    COMPILERS[engine].compile(
        gated_by_reasoning(spec_from_choices([" yes", "no"]), ReasoningTags(*gate_tags("deepseek-r1")))
    )


def test_a_json_schema_that_mentions_the_end_tag_is_still_gated():
    """A description (or a const) naming ``</think>`` is no reasoning inside the JSON value; the
    spec-text search that keeps a regex spelling the tag ungated must not apply to a schema."""
    schema = {"type": "object", "description": "never write the </think> tag", "properties": {"a": {"type": "integer"}}}
    tags = ReasoningTags(*gate_tags("deepseek-r1"))
    assert gated_by_reasoning(spec_from_json_schema(schema), tags).reasoning == tags
    assert gated_by_reasoning(spec_from_regex(r"<think>x</think>\d"), tags).reasoning is None


def test_gated_answers_fill_in_llguidance_batch_call_with_the_same_rows():
    """Once the answer began, a gated matcher's row comes from llguidance's batch call (it was
    filled row by row, serially); the rows equal each matcher's own ``fill_bitmask``."""
    from llmir_lang.executor.constraints import fill_batch_bitmask

    compiled = _gated("llguidance", "json", "deepseek-r1")
    matchers = []
    for text in ("hm</think>", "hm</think>\n\n{", 'a</think>{"a":1'):
        m = compiled.new_matcher()
        for ch in text:
            assert m.advance(IDS[ch]), text
        matchers.append(m)
    assert all(m.batch_delegate() is not None for m in matchers[1:])
    batch = allocate_bitmask(len(matchers), INFO.vocab_size)
    assert fill_batch_bitmask(matchers, batch) == []
    for i, m in enumerate(matchers):
        own = allocate_bitmask(1, INFO.vocab_size)
        m.fill_bitmask(own, 0)
        assert bool((own[0] == batch[i]).all()), i
