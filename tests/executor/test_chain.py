"""Chains (gen -> constant text -> gen) run as one engine request and equal call-by-call runs."""

from __future__ import annotations

import pytest

from llmir_lang import errors
from llmir_lang.executor.backend import ChainRequest, EngineBackend, GenStep
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def backend(checkpoints):
    folder, _ = checkpoints("llama")
    eng = Engine(str(folder), device="cpu", kv_memory="8MB")
    yield EngineBackend(eng)
    eng.shutdown()


def _call_by_call(be: EngineBackend, prompt: str, steps: list) -> tuple[str, list[list[int]]]:
    text, tokens = "", []
    for step in steps:
        if isinstance(step, str):
            text += step
        else:
            r = be.run([ChainRequest(prompt + text, [step])])[0]
            text += r.text
            tokens.append(r.steps[0].token_ids)
    return text, tokens


@pytest.mark.parametrize(
    "steps",
    [
        [GenStep("a", SamplingParams(max_new_tokens=5, ignore_eos=True))],
        [
            GenStep("a", SamplingParams(max_new_tokens=6, ignore_eos=True)),
            " name: Ada, age: ",
            GenStep("b", SamplingParams(max_new_tokens=4, ignore_eos=True)),
            ", city",
        ],
        [
            "the ",
            GenStep("a", SamplingParams(max_new_tokens=3, ignore_eos=True)),
            GenStep("b", SamplingParams(max_new_tokens=3, ignore_eos=True)),
            " over the lazy",
            GenStep("c", SamplingParams(max_new_tokens=5, ignore_eos=True, stop=["o"])),
        ],
        [  # stop regexes: each step scans its own text from its start
            GenStep("a", SamplingParams(max_new_tokens=8, ignore_eos=True, stop_regex=[r"s\W"])),
            " and then ",
            GenStep("b", SamplingParams(max_new_tokens=8, ignore_eos=True, stop_regex=r",|W")),
        ],
        [  # a gen of max_new_tokens 0 (prefill only) ended the whole chain: 'b' got no result
            GenStep("a", SamplingParams(max_new_tokens=0)),
            " then",
            GenStep("b", SamplingParams(max_new_tokens=3, ignore_eos=True)),
        ],
    ],
)
def test_chain_equals_call_by_call(backend, steps):
    prompt = "the quick brown fox"
    eng = backend.engine
    before = eng.stats()["forward_calls"]
    chained = backend.run([ChainRequest(prompt, steps)])[0]
    chain_calls = eng.stats()["forward_calls"] - before
    text, tokens = _call_by_call(backend, prompt, steps)
    assert chained.error is None
    assert chained.text == text
    assert [s.token_ids for s in chained.steps] == tokens
    assert [s.name for s in chained.steps] == [s.name for s in steps if not isinstance(s, str)]
    gens = [s for s in steps if not isinstance(s, str)]
    # one forward per generated token at most (a gen of 0 tokens: its prefill): the constant text
    # costs no extra model calls
    assert chain_calls <= sum(max(s.params.max_new_tokens, 1) for s in gens)


def test_chain_streams_each_generation(backend):
    seen: list[tuple[int, str]] = []
    steps = [
        GenStep("a", SamplingParams(max_new_tokens=4, ignore_eos=True)),
        " and ",
        GenStep("b", SamplingParams(max_new_tokens=4, ignore_eos=True)),
    ]
    r = backend.submit(ChainRequest("the quick", steps), on_chunk=lambda i, t: seen.append((i, t))).result()
    assert "".join(t for i, t in seen if i == 0) == r.steps[0].text
    assert "".join(t for i, t in seen if i == 1) == r.steps[1].text


def test_chain_bad_input(backend):
    with pytest.raises(errors.InvalidRequestError):
        backend.engine.submit_chain("x", [("text", "only text")])
    with pytest.raises(errors.InvalidRequestError):
        backend.engine.submit_chain("x", [("gen", SamplingParams(max_new_tokens=1), None), ("bogus",)])


def test_chain_gen_step_takes_a_dict_as_submit_does(backend):
    """A gen step's params may be a dict, converted and checked as ``submit`` converts its dict."""
    eng = backend.engine
    prompt, text = "the quick brown fox", ("text", " over the lazy")
    as_params = eng.submit_chain(
        prompt,
        [
            ("gen", SamplingParams(max_new_tokens=4, ignore_eos=True), None),
            text,
            ("gen", SamplingParams(max_new_tokens=3, ignore_eos=True), None),
        ],
    ).result()
    as_dict = eng.submit_chain(
        prompt,
        [
            ("gen", {"max_new_tokens": 4, "ignore_eos": True}, None),
            text,
            ("gen", {"max_new_tokens": 3, "ignore_eos": True}, None),
        ],
    ).result()
    assert as_dict.meta["chain_text"] == as_params.meta["chain_text"]
    assert [s.token_ids for s in as_dict.meta["steps"]] == [s.token_ids for s in as_params.meta["steps"]]
    # a bad dict: the same typed error, and the same message, as submit gives
    for bad in ({"max_tokens": 4}, {"max_new_tokens": -1}, {"temperature": "hot"}):
        with pytest.raises(errors.InvalidRequestError) as chained:
            eng.submit_chain(prompt, [("gen", bad, None)])
        with pytest.raises(errors.InvalidRequestError) as submitted:
            eng.submit(prompt, bad)
        assert str(chained.value) == str(submitted.value)
    with pytest.raises(errors.InvalidRequestError, match="SamplingParams or a dict"):
        eng.submit_chain(prompt, [("gen", [4], None)])


def test_a_refused_next_generation_reports_no_text_of_its_own(backend):
    """The chain's text outgrows the context before its second generation: that one is refused
    with no tokens, and the first keeps its own result (it was reported twice: the refused step
    a copy of the first one's text and tokens, and that text twice in ``chain_text``)."""
    eng = backend.engine
    filler = " fox" * eng.config.context_len
    chunks: list = []
    res = eng.submit_chain(
        "the quick",
        [
            ("gen", SamplingParams(max_new_tokens=3, ignore_eos=True), None),
            ("text", filler),
            ("gen", SamplingParams(max_new_tokens=3, ignore_eos=True), None),
        ],
        stream=chunks.append,
    ).result()
    first, refused = res.meta["steps"]
    assert len(first.token_ids) == 3 and first.finish_reason == "length"
    assert refused.text == "" and refused.token_ids == [] and refused.completion_tokens == 0
    assert refused.finish_reason == "length" and "context" in (refused.error or "")
    assert res.meta["chain_text"] == first.text + filler
    assert res.text == "" and res.error == refused.error
    assert "".join(c.text for c in chunks) == first.text  # streamed once, all of it
