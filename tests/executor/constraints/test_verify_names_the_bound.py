"""A bound on the engine's work passed inside speculation's verify ends the request naming it.

Verify computes the mask of each state its draft reaches, then rolls the draft back and appends
the tokens it keeps; the position whose mask passed a bound samples -1, and ``append`` ends the
request with the matcher's ``error()``. That reason went with the rollback: the request ended as a
plain dead end. The matcher now remembers the state where a bound was passed (and does not compute
that mask again), so the request ends as the non-speculative path ends it. Any other dead row's
reason is asked of the matcher again once it is back in that state.

``append`` here is the engine's contract reduced to what the matcher sees: each kept token is
advanced, and a -1 reads ``error()`` (``engine_output.OutputProcessor.append``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmir_lang.executor import speculate
from llmir_lang.executor.constraints import (
    ConstraintCompiler,
    allocate_bitmask,
    fill_batch_bitmask,
    spec_from_grammar,
)
from llmir_lang.executor.constraints.matcher import Matcher, word_bit
from llmir_lang.executor.sampler import Sampler
from llmir_lang.executor.sampling_params import SamplingParams

AMBIGUOUS = 'start: e\ne: e e | e "+" e | "a" | "b"\n'


@pytest.fixture()
def small_step_limit(parser_limits):
    """A step limit that ``AMBIGUOUS``'s masks pass after a couple of hundred tokens."""
    parser_limits(step_max_items=2000)


def _verify(m, draft: list[int], vocab: int) -> list[tuple[int, str | None, str | None]]:
    """Run speculation's verify of ``draft`` from ``m``'s state with logits that pick each draft
    token; what ``append`` got: (token, error(), over_budget()) where the token is -1."""
    got: list[tuple[int, str | None, str | None]] = []
    req = SimpleNamespace(
        matcher=m, params=SamplingParams(max_new_tokens=1000), generator=None, prompt_ids=[1],
        output_ids=[], num_draft_tokens=0, num_draft_accepted=0, finished=False, rebase_to=None,
    )  # fmt: skip

    def append(req, token, logprob, top):
        if token < 0:
            got.append((token, m.error(), m.over_budget()))
            req.finished = True
        else:
            assert m.advance(token)
            got.append((token, None, None))

    proc = SimpleNamespace(
        engine=SimpleNamespace(sampler=Sampler(vocab)), append=append, _banned=lambda req, ahead=0: []
    )
    logits = torch.zeros(len(draft) + 1, vocab)
    for i, t in enumerate(draft):
        logits[i, t] = 10.0
    speculate.verify(proc, [(req, 0, draft)], logits)
    return got


def test_a_parser_limit_passed_at_a_draft_position_is_named(small_step_limit, sp_info):
    compiled = ConstraintCompiler(sp_info).compile(spec_from_grammar(AMBIGUOUS))
    a, plus = sp_info.token_bytes.index(b"a"), sp_info.token_bytes.index(b"+")
    # the non-speculative path: a mask each step, until one passes the limit
    plain = compiled.new_matcher()
    mask = allocate_bitmask(1, sp_info.vocab_size)
    tokens: list[int] = []
    while len(tokens) < 600 and not fill_batch_bitmask([plain], mask):
        tokens.append(a if len(tokens) % 2 == 0 else plus)
        assert plain.advance(tokens[-1])
    assert plain.over_budget() == "step_max_items", "the mask never passed the limit"
    expected = plain.error()
    # speculation reaches that state three tokens into a draft of five; no mask computed on the
    # way (propose checks a draft by advancing through it)
    m = compiled.new_matcher()
    for t in tokens[:-3]:
        assert m.advance(t)
    draft = tokens[-3:] + [a if len(tokens) % 2 == 0 else plus, plus]
    got = _verify(m, draft, sp_info.vocab_size)
    assert got == [(t, None, None) for t in draft[:3]] + [(-1, expected, "step_max_items")]


def test_forced_text_that_never_ends_at_a_draft_position_is_named(sp_info):
    # lark_flow passes this grammar; after "a" only "c" is ever allowed (the forcing guard)
    compiled = ConstraintCompiler(sp_info).compile(spec_from_grammar('start: "x" A "c"\nA: /[ab]c+/\n'))
    x, a, c = (sp_info.token_bytes.index(ch) for ch in (b"x", b"a", b"c"))
    got = _verify(compiled.new_matcher(), [x, a, c], sp_info.vocab_size)
    assert got[:2] == [(x, None, None), (a, None, None)]
    token, why, limit = got[2]
    assert token == -1 and limit == "forced text" and "never ends" in why


def test_the_engine_ends_the_request_naming_the_limit_with_speculation_too(parser_limits, monkeypatch):
    """The tiny model's greedy output under ``AMBIGUOUS`` until a mask passes the step limit, then
    with drafts of that same output, so that every draft is kept and one reaches the limit."""
    from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
    from llmir_lang.executor.engine import Engine

    parser_limits(step_max_items=1200)
    prompt = "Write a sum: a+b+a+b+a+b+a+b+a+"
    params = SamplingParams(max_new_tokens=400, min_new_tokens=390)
    eng = Engine(device="cpu", kv_memory="64MB", speculative_draft_tokens=0)
    backend = EngineBackend(eng)

    def run():
        return backend.run([ChainRequest(prompt, [GenStep("x", params, spec_from_grammar(AMBIGUOUS))])])[0]

    try:
        plain = run()
        out = plain.steps[0].token_ids
        n_prompt = len(eng.tokenizer.encode(prompt))
        more = out + out[:2] * 8  # drafts past the end stay full length (shorter ones are dropped)
        monkeypatch.setattr(
            speculate,
            "lookup_draft",
            lambda ids, k, *a, **kw: more[len(ids) - n_prompt : len(ids) - n_prompt + k],
        )
        eng.speculative_draft_tokens = 4
        eng.flush_cache()
        drafted = run()
    finally:
        eng.shutdown()
    assert plain.steps[0].finish_reason == "constraint_error" and "Too many items" in plain.error, plain.error
    step = drafted.steps[0]
    assert step.token_ids == out and drafted.error == plain.error
    assert 0 < step.meta["spec_accepted_tokens"] == step.meta["spec_draft_tokens"]


class _Scripted(Matcher):
    """Allows the tokens of ``script`` in order, then nothing (not a complete text)."""

    engine = "scripted"
    eos_token_ids = (0,)

    def __init__(self, script: list[int], vocab: int) -> None:
        self.script, self.vocab_size, self.taken, self.dead = script, vocab, 0, None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        if self.taken < len(self.script):
            t = self.script[self.taken]
            bitmask[row, t // 32] = word_bit(t % 32)

    def advance(self, token_id: int) -> bool:
        ok = self.taken < len(self.script) and token_id == self.script[self.taken]
        self.taken += ok
        return ok

    def rollback(self, n: int) -> None:
        self.taken -= n
        self.dead = None

    def note_dead_end(self) -> None:
        self.dead = "nothing fits after the script"

    def error(self) -> str | None:
        return self.dead

    def is_accepting(self) -> bool:
        return False

    def is_terminated(self) -> bool:
        return False

    def forced_tokens(self) -> list[int]:
        return []

    def forced_text(self) -> str:
        return ""


def test_a_dead_end_at_a_draft_position_gives_the_matcher_s_reason():
    got = _verify(_Scripted([5, 6], 64), [5, 6, 7], 64)
    assert got == [(5, None, None), (6, None, None), (-1, "nothing fits after the script", None)]
