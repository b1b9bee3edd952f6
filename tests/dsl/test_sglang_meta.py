"""SGLang's meta-info shapes on the embedded engine: a gen's ``output_token_logprobs`` /
``output_top_logprobs`` triples (SGLang's cot_decoding example reads them) and a select's
``normalized_prompt_logprobs`` / ``input_token_logprobs`` (its choices_logprob example)."""

from __future__ import annotations

import math

import pytest

import llmir_lang as llmir


def test_gen_logprob_triples_and_top_logprobs(rt):
    @llmir.function
    def prog(s):
        s += "Q: hi\nA:" + llmir.gen("a", max_tokens=3, ignore_eos=True, top_logprobs_num=2)
        s += "\nB:" + llmir.gen("b", max_tokens=2, ignore_eos=True, return_logprob=True, return_text_in_logprobs=True)

    state = prog.run(backend=rt)
    a, b = state.get_meta_info("a"), state.get_meta_info("b")
    assert [t[1] for t in a["output_token_logprobs"]] == a["token_ids"]
    assert [t[0] for t in a["output_token_logprobs"]] == a["logprobs"]
    assert all(t[2] is None for t in a["output_token_logprobs"])  # no text asked for
    tops = a["output_top_logprobs"]
    assert len(tops) == 3 and all(len(top) == 2 for top in tops)
    for (lp, tid, _), top in zip(a["output_token_logprobs"], tops):
        assert top[0][0] >= top[1][0]  # most likely first
        assert lp <= top[0][0] + 1e-5  # greedy picks the most likely token
        assert tid == top[0][1]
    # with return_text_in_logprobs each triple carries its token's text, which adds up to the value
    assert "output_top_logprobs" not in b
    assert "".join(t[2] for t in b["output_token_logprobs"]) == state["b"]


@pytest.mark.parametrize("passes", [None, ""])
def test_gen_of_zero_tokens_reports_the_next_tokens_alternatives(rt, passes):
    """SGLang's cot_decoding: ``gen(max_tokens=0, top_logprobs_num=k)`` generates nothing and its
    ``output_top_logprobs[0]`` holds the k most likely next tokens; a branch is forked per token."""
    kw = {} if passes is None else {"passes": passes}

    @llmir.function
    def both(s):
        s += "Q: What is 3 + 4?\nA:"
        s += llmir.gen("zero", max_tokens=0, top_logprobs_num=4, return_text_in_logprobs=True)
        s += llmir.gen("one", max_tokens=1, top_logprobs_num=4)

    st = both.run(backend=rt, **kw)
    zero, one = st.get_meta_info("zero"), st.get_meta_info("one")
    assert st["zero"] == "" and zero["output_token_logprobs"] == [] and zero["completion_tokens"] == 0
    (top,) = zero["output_top_logprobs"]
    assert len(top) == 4 and [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)
    # the same alternatives as a one-token gen's at the same position
    for (lp, tid, text), (lp1, tid1, _) in zip(top, one["output_top_logprobs"][0]):
        assert tid == tid1 and lp == pytest.approx(lp1, abs=1e-4) and text == rt.engine.tokenizer.decode([tid])

    @llmir.function
    def cot(s, k):
        s += "Q: What is 3 + 4?\nA:"
        step_0 = s.fork(1)[0]
        step_0 += llmir.gen("get_top_k", max_tokens=0, top_logprobs_num=k, return_text_in_logprobs=True)
        alternatives = step_0.get_meta_info("get_top_k")["output_top_logprobs"][0]
        forks = s.fork(k)
        for i, (_, _, token_text) in enumerate(alternatives):
            forks[i] += token_text + llmir.gen("answer", max_tokens=2)
        forks.join()

    state = cot.run(k=3, backend=rt, **kw)
    assert state.error() is None and len(state["answer"]) == 3  # one answer per alternative
    assert len({t[1] for t in top[:3]}) == 3


def test_select_meta_under_sglang_names(rt):
    @llmir.function
    def prog(s):
        s += "Statement: the sky is blue.\nAnswer:" + llmir.select("ans", ["True", "False", " Unknown value"])

    state = prog.run(backend=rt)
    meta = state.get_meta_info("ans")
    assert meta["normalized_prompt_logprobs"] == pytest.approx([sum(lps) / len(lps) for lps in meta["logprobs"]])
    assert state["ans"] == meta["choices"][max(range(3), key=meta["normalized_prompt_logprobs"].__getitem__)]
    tok = rt.engine.tokenizer
    for choice, lps, triples in zip(meta["choices"], meta["logprobs"], meta["input_token_logprobs"]):
        assert [t[1] for t in triples] == tok.encode(choice, add_special_tokens=False)
        assert [t[0] for t in triples] == lps
        assert "".join(t[2] for t in triples) == choice  # each token's text, as SGLang's select gives
        assert all(t[0] <= 0 and math.isfinite(t[0]) for t in triples)
    assert meta["output_token_logprobs"] == [[], [], []]


def test_gen_arguments_of_logprobs_are_checked():
    for bad in ("0", -2, True, 1.5):
        with pytest.raises(llmir.DSLError, match="logprob_start_len must be an integer >= 0"):
            llmir.gen("a", logprob_start_len=bad)
    assert "logprob_start_len" not in llmir.gen("a", logprob_start_len=-1).attrs  # SGLang's "none"
    with pytest.raises(llmir.DSLError, match="return_text_in_logprobs"):
        llmir.gen("a", return_text_in_logprobs="yes")


@llmir.function
def prompt_logprobs(s):
    s += "Q: What is 3 + 4?\nA:" + llmir.gen("a", max_tokens=3, logprob_start_len=2, return_text_in_logprobs=True)
    s += "\nQ: and 5 + 5?\nA:" + llmir.gen("b", max_tokens=2, logprob_start_len=0)
    s += "\nok" + llmir.gen("c", max_tokens=2)


@pytest.mark.parametrize("passes", [None, ""])
def test_gen_reports_its_prompts_token_logprobs(rt, passes):
    """SGLang's logprob_start_len: input_token_logprobs from that prompt token on, the first
    without a logprob, as the engine scores the same prompt (and the same in both modes)."""
    kw = {} if passes is None else {"passes": passes}
    state = prompt_logprobs.run(backend=rt, **kw)
    assert state.error() is None
    eng = rt.engine
    for name, start, prompt in (
        ("a", 2, "Q: What is 3 + 4?\nA:"),
        ("b", 0, "Q: What is 3 + 4?\nA:" + state["a"] + "\nQ: and 5 + 5?\nA:"),
    ):
        meta = state.get_meta_info(name)
        ids = eng.encode(prompt)
        ref = eng.generate(ids, {"max_new_tokens": 1, "return_prompt_logprob": True}).prompt_logprobs
        got = meta["input_token_logprobs"]
        assert len(got) == len(ids) - start == meta["prompt_tokens"] - start
        assert [e[1] for e in got] == ids[start:] and got[0][0] is None
        assert [e[0] for e in got[1:]] == pytest.approx([lp for _, lp in ref[start:]], abs=1e-4)
        with_text = name == "a"
        assert all((e[2] == eng.tokenizer.decode([e[1]])) if with_text else e[2] is None for e in got)
        assert meta["output_token_logprobs"]  # asking for the prompt's logprobs asks for logprobs
    assert "input_token_logprobs" not in state.get_meta_info("c")
    plain = prompt_logprobs.run(backend=rt, passes="")
    assert plain.text() == state.text()


@llmir.function
def regex_stopped(s, stop_regex):
    s += "Q: What is 3 + 4?\nA:" + llmir.gen("a", max_tokens=12, ignore_eos=True, stop_regex=stop_regex)
    s += "\nQ: and 15 + 25?\nA:" + llmir.gen("b", max_tokens=12, ignore_eos=True, stop_regex=[r"\nQ", r"\d\d\n"])


@pytest.mark.parametrize("passes", [None, ""])
def test_gen_stops_at_a_regex_match_cut_where_it_starts(rt, passes):
    """SGLang's stop_regex: each gen ends at the first token after which its text holds a match,
    the text cut where the match starts; ``matched_stop`` names the pattern. The same in both
    modes (with passes the two gens and the text between them are one chained request), and the
    same as cutting the unstopped text."""
    kw = {} if passes is None else {"passes": passes}
    free = regex_stopped.run(stop_regex=None, backend=rt, passes="")
    state = regex_stopped.run(stop_regex=r"\n", backend=rt, **kw)
    assert state.error() is None
    assert state["a"] == free["a"][: free["a"].index("\n")]
    a, b = state.get_meta_info("a"), state.get_meta_info("b")
    assert a["finish_reason"] == "stop" and a["matched_stop"] == r"\n"
    assert a["completion_tokens"] < 12
    import re

    # b's prompt differs from the unstopped run's (a is shorter), so b is checked against itself
    ref = rt.engine.generate(
        rt.engine.encode("Q: What is 3 + 4?\nA:" + state["a"] + "\nQ: and 15 + 25?\nA:"),
        {"max_new_tokens": 12, "ignore_eos": True},
    ).text
    first = min((m.start(), p) for p in (r"\nQ", r"\d\d\n") for m in [re.search(p, ref)] if m)
    assert state["b"] == ref[: first[0]] and b["matched_stop"] == first[1]
    plain = regex_stopped.run(stop_regex=r"\n", backend=rt, passes="")
    assert plain.text() == state.text()


def test_a_bad_stop_regex_is_an_error_at_the_gen():
    with pytest.raises(llmir.DSLError, match="does not parse") as e:
        llmir.gen("x", stop_regex="(a")
    assert e.value.where is not None and e.value.where.line > 0
    with pytest.raises(llmir.DSLError, match="empty string"):
        llmir.gen("x", stop_regex=["ok", "a?"])
    assert llmir.gen("x", stop_regex=r"\d").attrs == {"stop_regex": [r"\d"]}


def test_a_gen_asking_for_its_prompts_logprobs_starts_its_own_request():
    from llmir_lang.ir import print_ir
    from llmir_lang.optimizer import run_pipeline

    text = print_ir(run_pipeline(prompt_logprobs.trace()))
    # a and its text fuse with nothing before them; b asks too, so it starts a chain with c
    assert text.count("gen.chain") == 1 and '"b"' in text.split("gen.chain")[1].split("\n")[0]


def test_remote_sglang_meta_takes_ids_and_top_logprobs_from_the_server():
    """An SGLang server sends no ``output_ids``: the ids come from its logprob entries, and its
    top logprobs reach the program (they were dropped)."""
    import httpx

    meta = {
        "finish_reason": {"type": "length"},
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "output_token_logprobs": [[-0.1, 11, None], [-0.5, 12, None]],
        "output_top_logprobs": [[[-0.1, 11, None], [-2.0, 13, None]], [[-0.5, 12, None], [-1.5, 14, None]]],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generate":
            return httpx.Response(200, json={"text": " 4.", "meta_info": meta})
        return httpx.Response(404, text="not found")

    ep = llmir.RuntimeEndpoint("http://sglang:30000", protocol="sglang")
    ep._client = httpx.Client(base_url=ep.base_url, transport=httpx.MockTransport(handler))

    @llmir.function
    def prog(s):
        s += "2 + 2 =" + llmir.gen("a", max_tokens=2, top_logprobs_num=2)

    got = prog.run(backend=ep).get_meta_info("a")
    ep.close()
    assert got["token_ids"] == [11, 12]
    assert got["output_token_logprobs"] == [(-0.1, 11, None), (-0.5, 12, None)]
    assert got["output_top_logprobs"] == [[(-0.1, 11, None), (-2.0, 13, None)], [(-0.5, 12, None), (-1.5, 14, None)]]
