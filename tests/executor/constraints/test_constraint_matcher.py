"""Matchers of both engines: masks, EOS, rollback, jump-forward, batch fill, logits masking."""

from __future__ import annotations

import pytest
import torch
from llmir_lang.kernels.reference import apply_token_bitmask

from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    Matcher,
    TokenizerInfo,
    allocate_bitmask,
    apply_bitmask,
    fill_batch_bitmask,
    spec_from_choices,
    spec_from_json_schema,
    spec_from_regex,
)

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "kind": {"enum": ["cat", "dog"]}},
    "required": ["name", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["outlines-core", "llguidance"])
def pinned(request, bpe_info):
    return ConstraintCompiler(bpe_info, engine=request.param)


def bits(mask: torch.Tensor, row: int = 0) -> set[int]:
    words = mask[row].tolist()
    return {32 * w + b for w, word in enumerate(words) for b in range(32) if (word >> b) & 1}


def test_mask_agrees_with_advance(pinned, bpe_info, bpe_hf):
    compiled = pinned.compile(spec_from_regex("(ab|abcd)[0-9]{1,2}"))
    mask = allocate_bitmask(1, bpe_info.vocab_size)
    for prefix, next_bytes in [("", b"a"), ("ab", b"c0123456789"), ("abc", b"d"), ("abcd1", b"0123456789")]:
        m = compiled.new_matcher()
        for t in bpe_hf.encode(prefix):
            assert m.advance(t)
        m.fill_bitmask(mask, 0)
        allowed = bits(mask)
        assert allowed, prefix
        for t in allowed:  # every allowed token is taken (and undone)
            if t in bpe_info.eos_token_ids:
                continue
            assert bpe_info.token_bytes[t][:1] in [bytes([c]) for c in next_bytes], (prefix, t)
            assert m.advance(t), (prefix, t)
            m.rollback(1)
        if compiled.engine == "outlines-core":  # exact: nothing outside the mask is taken
            for t in range(0, bpe_info.vocab_size, 37):
                if t not in allowed:
                    assert not m.advance(t), (prefix, t)
        assert (bpe_info.eos_token_ids[0] in allowed) == m.is_accepting() == (prefix == "abcd1")


def test_eos_only_in_accepting_states_and_terminates(pinned, bpe_info, bpe_hf):
    compiled = pinned.compile(spec_from_choices(["yes", "yesterday"]))
    eos = bpe_info.eos_token_ids[0]
    mask = allocate_bitmask(1, bpe_info.vocab_size)
    m = compiled.new_matcher()
    m.fill_bitmask(mask, 0)
    assert eos not in bits(mask) and not m.advance(eos) and not m.is_accepting()
    for t in bpe_hf.encode("yes"):
        assert m.advance(t)
    m.fill_bitmask(mask, 0)
    assert eos in bits(mask) and m.is_accepting() and not m.is_terminated()
    assert m.forced_text() == ""  # "yes" may end here or continue: nothing is forced
    assert m.advance(eos) and m.is_terminated()
    m.fill_bitmask(mask, 0)
    assert not bits(mask) and not m.advance(bpe_hf.encode("t")[0])


def test_several_eos_ids(bpe_hf):
    im_end = bpe_hf.convert_tokens_to_ids("<|im_end|>")
    info = TokenizerInfo.from_hf(bpe_hf, eos_token_ids=[0, im_end])
    for engine in ("outlines-core", "llguidance"):
        compiled = ConstraintCompiler(info, engine=engine).compile(spec_from_regex("ok"))
        m = compiled.new_matcher()
        for t in bpe_hf.encode("ok"):
            m.advance(t)
        mask = allocate_bitmask(1, info.vocab_size)
        m.fill_bitmask(mask, 0)
        assert {0, im_end} <= bits(mask), engine
        assert m.advance(im_end) and m.is_terminated()


def test_rollback_restores_state_including_eos(pinned, bpe_info, bpe_hf):
    compiled = pinned.compile(spec_from_json_schema(SCHEMA))
    text = '{"name": "Rex", "kind": "dog"}'
    ids = bpe_hf.encode(text)
    m = compiled.new_matcher()
    masks = []
    mask = allocate_bitmask(1, bpe_info.vocab_size)
    for t in ids:
        m.fill_bitmask(mask, 0)
        masks.append(mask.clone())
        assert m.advance(t)
    assert m.advance(bpe_info.eos_token_ids[0]) and m.is_terminated()
    m.rollback(1)  # the EOS alone
    assert m.is_accepting() and m.advance(bpe_info.eos_token_ids[0])
    m.rollback(3)  # EOS and two tokens
    m.fill_bitmask(mask, 0)
    assert torch.equal(mask, masks[len(ids) - 2]) and not m.is_accepting()
    m.rollback(2)
    m.fill_bitmask(mask, 0)
    assert torch.equal(mask, masks[len(ids) - 4])
    for t in ids[-4:]:
        assert m.advance(t)
    assert m.is_accepting()
    with pytest.raises(Exception, match="roll back"):
        m.rollback(len(ids) + 5)


def test_refused_token_leaves_state_unchanged(pinned, bpe_info, bpe_hf):
    compiled = pinned.compile(spec_from_json_schema(SCHEMA))
    m = compiled.new_matcher()
    for t in bpe_hf.encode('{"name": "a'):
        assert m.advance(t)
    before, after = allocate_bitmask(1, bpe_info.vocab_size), allocate_bitmask(1, bpe_info.vocab_size)
    m.fill_bitmask(before, 0)
    assert not m.advance(bpe_info.eos_token_ids[0])
    assert not m.advance(bpe_hf.convert_tokens_to_ids("<|im_start|>"))
    m.fill_bitmask(after, 0)
    assert torch.equal(before, after)


def test_jump_forward_text_and_tokens(bpe_info, bpe_hf):
    """With compact whitespace a JSON key and its punctuation are forced."""
    spec = spec_from_json_schema(SCHEMA, whitespace="")
    for engine in ("outlines-core", "llguidance"):
        m = ConstraintCompiler(bpe_info, engine=engine).compile(spec).new_matcher()
        assert m.forced_text() == '{"name":"', engine
        ids = m.forced_tokens()
        assert bpe_info.decode_bytes(ids) and b'{"name":"'.startswith(bpe_info.decode_bytes(ids))
        for t in ids:
            assert m.advance(t)
        for t in bpe_hf.encode('{"name":"Rex"'[len(bpe_info.decode_bytes(ids)) :]):
            assert m.advance(t)
        assert m.forced_text() == ',"kind":"', engine
        for t in bpe_hf.encode(',"kind":"c'):
            assert m.advance(t)
        assert m.forced_text() == 'at"}', engine
        for t in bpe_hf.encode('at"}'):
            assert m.advance(t)
        assert m.is_terminated() and m.forced_text() == "" and m.forced_tokens() == []


def test_choices_forced_rest_of_choice(pinned, bpe_info, bpe_hf):
    m = pinned.compile(spec_from_choices(["maybe later", "no"])).new_matcher()
    assert m.advance(bpe_hf.encode("m")[0])
    assert m.forced_text() == "aybe later"
    ids = m.forced_tokens()
    assert bpe_info.decode_bytes(ids) == b"aybe later"[: len(bpe_info.decode_bytes(ids))]
    for t in ids:
        assert m.advance(t)


class _DeadMatcher(Matcher):
    """A matcher whose constraint has dead-ended: empty mask, not accepting."""

    engine = "test"
    eos_token_ids = (0,)
    vocab_size = 64

    def __init__(self) -> None:
        self._dead: str | None = None

    def fill_bitmask(self, bitmask, row):
        bitmask[row].zero_()

    def advance(self, token_id):
        return False

    def is_accepting(self):
        return False

    def is_terminated(self):
        return False

    def forced_tokens(self):
        return []

    def forced_text(self):
        return ""

    def rollback(self, n):
        self._check_rollback(n, 0)

    def note_dead_end(self):
        self._dead = "dead"

    def error(self):
        return self._dead


def test_batch_fill_mixes_engines_none_rows_and_dead_rows(bpe_info, bpe_hf, compiler):
    a = compiler.compile(spec_from_json_schema(SCHEMA)).new_matcher()  # outlines-core
    b = compiler.compile(spec_from_json_schema({"type": "integer", "minimum": 10})).new_matcher()
    assert (a.engine, b.engine) == ("outlines-core", "llguidance")
    batch = allocate_bitmask(4, bpe_info.vocab_size)
    batch.zero_()
    assert fill_batch_bitmask([a, None, b], batch) == []
    single = allocate_bitmask(1, bpe_info.vocab_size)
    a.fill_bitmask(single, 0)
    assert torch.equal(batch[0], single[0])
    b.fill_bitmask(single, 0)
    assert torch.equal(batch[2], single[0])
    assert bool((batch[1] == -1).all()) and bool((batch[3] == 0).all())

    dead = _DeadMatcher()
    small = allocate_bitmask(2, 64)
    assert fill_batch_bitmask([None, dead], small) == [1]
    assert dead.error() == "dead"


def test_batch_fill_rejects_wrong_bitmask():
    with pytest.raises(Exception, match="int32"):
        fill_batch_bitmask([None], torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(Exception, match="fewer rows"):
        fill_batch_bitmask([None, None], torch.zeros(1, 4, dtype=torch.int32))


@pytest.mark.parametrize("vocab, words", [(100, 4), (96, 3), (130, 4)])
def test_apply_bitmask_matches_reference(vocab, words):
    g = torch.Generator().manual_seed(vocab)
    mask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
    mask[0, 0] = -1
    mask[1] = 0
    logits = torch.randn(3, vocab, generator=g)
    ours, ref = logits.clone(), logits.clone()
    apply_bitmask(ours, mask)
    if vocab > 32 * words:  # the reference only reads covered columns; the rest must be masked
        ref[:, 32 * words :] = float("-inf")
        apply_token_bitmask(ref[:, : 32 * words], mask)
    else:
        apply_token_bitmask(ref, mask)
    assert torch.equal(ours, ref)


def test_rollback_of_eos_as_the_only_token(pinned, bpe_info):
    m = pinned.compile(spec_from_regex("(ab)?")).new_matcher()
    eos = bpe_info.eos_token_ids[0]
    assert m.is_accepting() and m.advance(eos) and m.is_terminated()
    m.rollback(1)
    assert not m.is_terminated() and m.is_accepting() and m.advance(bpe_info.token_bytes.index(b"ab"))
