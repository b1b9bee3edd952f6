"""Small user mistakes: each is a typed error that names the cause and what to do, at the user's
line where the library reports one (not a silent no-op, a plain AttributeError or TypeError)."""

from __future__ import annotations

import inspect
import json

import pytest
from fake_backend import FakeBackend

import llmir_lang as llmir
from llmir_lang.dsl import DSLError, FeatureNotSupportedError, ProgramArgumentError, ProgramDefinitionError
from llmir_lang.ir import print_ir
from llmir_lang.optimizer import PassPipelineError
from llmir_lang.optimizer.pass_manager import PassManager, parse_pipeline, pipeline_text

HERE = "test_user_mistakes.py"


def _line_of(fn, needle: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if needle in line)


# --- 1. async def / generator bodies -----------------------------------------------------------
def test_async_def_body_is_refused_at_definition():
    async def qa(s, question):
        s += question + llmir.gen("answer", max_tokens=2)

    with pytest.raises(ProgramDefinitionError) as e:
        llmir.function(qa)
    text = str(e.value)
    assert "program 'qa'" in text and f"{HERE}:{qa.__code__.co_firstlineno}" in text, text
    assert "async def" in text and "plain def" in text and "await qa.arun(...)" in text, text
    assert e.value.where is not None and e.value.where.line == qa.__code__.co_firstlineno


@pytest.mark.parametrize("kind", ["generator", "async generator"])
def test_generator_body_is_refused_at_definition(kind):
    def gen_body(s):
        s += "x"
        yield

    async def agen_body(s):
        s += "x"
        yield

    body = gen_body if kind == "generator" else agen_body
    with pytest.raises(ProgramDefinitionError) as e:
        llmir.function(name="prog")(body)
    text = str(e.value)
    assert "program 'prog'" in text and kind in text and "plain def" in text, text


# --- 2. parameters named like an option of run() / run_batch() / trace() ------------------------
def _ask(s, stream):
    s += "Q: (" + stream + ")\nA: " + llmir.gen("a", max_tokens=2)


def _with_backend(s, question, backend="x"):
    s += question + backend + llmir.gen("a", max_tokens=2)


def _with_stream_flag(s, stream=True):  # run(stream=False) silently gave the program True
    s += "streamed" if stream else "not streamed"


def _batch_options(s, num_threads=2, progress_bar="bar"):  # run_batch(num_threads=4) took it silently
    s += f"{num_threads} {progress_bar}"


@pytest.mark.parametrize(
    ("body", "param", "methods"),
    [
        (_ask, "stream", "run() and arun()"),
        (_with_backend, "backend", "run(), arun(), run_batch() and trace()"),
        (_with_stream_flag, "stream", "run() and arun()"),
        (_batch_options, "num_threads", "run_batch()"),
    ],
)
def test_parameter_named_like_an_option_is_refused_at_decoration(body, param, methods):
    """A parameter named like a keyword option of run / arun / run_batch / trace could not be told
    from the option in ``f.run(backend=...)`` (SGLang's run() takes such a keyword for itself
    too): it is refused where the program is defined, naming the parameter, the option and what
    to do, not at some calls and silently at others."""
    with pytest.raises(ProgramDefinitionError) as e:
        llmir.function(body)
    text = str(e.value)
    assert f"program '{body.__name__}'" in text and f"{HERE}:{body.__code__.co_firstlineno}" in text, text
    assert f"parameter {param!r}" in text and f"option {param}= of {methods}" in text, text
    assert f"rename the parameter (e.g. {param}_)" in text, text
    assert isinstance(e.value, TypeError) and e.value.where.line == body.__code__.co_firstlineno


def test_option_names_are_free_where_they_cannot_collide(fake):
    def positional_only(s, backend, /):  # never given by keyword, so never taken for the option
        s += "Q: " + backend + llmir.gen("a", max_tokens=2)

    def any_keywords(s, **kwargs):  # run(backend=...) is run()'s; bind() fills **kwargs
        s += "Q: " + kwargs.get("backend", "none")

    p = llmir.function(positional_only)
    assert p.run("rivers", backend=fake, stream=False).text().startswith("Q: rivers")
    assert p.run_batch([["lakes"]], backend=fake, num_threads=1)[0].text().startswith("Q: lakes")
    k = llmir.function(any_keywords)
    assert k.run(backend=fake).text() == "Q: none"
    assert k.bind(backend="x").run(backend=fake).text() == "Q: x"

    def sampling_name(s, temperature=0.5):  # a sampling default's name is the program's (documented)
        s += f"t={temperature}"

    assert llmir.function(sampling_name).run(temperature=0.9, backend=fake).text() == "t=0.9"


# --- 3. passes as a list -----------------------------------------------------------------------
def test_passes_as_a_list(fake):
    def prog(s, q):
        s += q + llmir.gen("a", max_tokens=2)

    p = llmir.function(prog)
    listed = p.run(q="Q:", passes=["canonicalize", "prefix-share{min_length=4}"], backend=fake)
    assert listed["a"] == p.run(q="Q:", passes="canonicalize,prefix-share{min_length=4}", backend=fake)["a"]
    assert llmir.function(passes=("canonicalize",))(prog).passes == "canonicalize"
    assert pipeline_text(["canonicalize", "fork-join"]) == "canonicalize,fork-join"
    assert [n for n, _ in parse_pipeline(["canonicalize", "fork-join"])] == ["canonicalize", "fork-join"]
    assert PassManager(("canonicalize",)).pass_names == ["canonicalize"]
    with pytest.raises(PassPipelineError, match="separated by commas"):
        p.run(q="Q:", passes=5, backend=fake)
    with pytest.raises(PassPipelineError, match="unknown pass 'nope'"):
        p.run(q="Q:", passes=["nope"], backend=fake)


# --- 4. stop values that are no string or list ------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"stop": 5}, ["stop must be a string or a list of strings", "int 5"]),
        ({"stop": {"a": 1}}, ["stop must be", "dict"]),
        ({"stop_regex": 5}, ["stop_regex must be a regex string or a list"]),
        ({"stop_token_ids": 5}, ["stop_token_ids must be a list of integer token ids", "[5]"]),
        ({"stop_token_ids": "ab"}, ["stop_token_ids must be a list of integer token ids", "str"]),
    ],
)
def test_stop_of_the_wrong_type(fake, kwargs, words):
    def prog(s):
        s += "Q: " + llmir.gen("a", max_tokens=2, **kwargs)

    with pytest.raises(DSLError) as e:
        llmir.function(prog).run(backend=fake)
    text = str(e.value)
    assert type(e.value) is DSLError, text
    assert f"{HERE}:{_line_of(prog, 'llmir.gen')}" in text and "gen('a')" in text, text
    for w in words:
        assert w in text, text


def test_stop_sequences_still_accepted():
    assert llmir.gen("a", stop=("x", "y")).attrs["stop"] == ["x", "y"]
    assert llmir.gen("a", stop="x").attrs["stop"] == ["x"]
    assert llmir.gen("a", stop_token_ids=(1, 2)).attrs["stop_token_ids"] == [1, 2]
    assert llmir.gen("a", stop_regex="x+").attrs["stop_regex"] == ["x+"]
    assert "stop_regex" not in llmir.gen("a", stop_regex=[]).attrs


# --- 5. a traced parameter as a sampling argument ---------------------------------------------
def test_traced_parameter_as_max_tokens(fake):
    def qa(s, question, n):
        s += "Q: " + question + "\nA: " + llmir.gen("answer", max_tokens=n)

    p = llmir.function(qa)
    with pytest.raises(FeatureNotSupportedError) as e:
        p.trace(backend=fake)
    text = str(e.value)
    assert "\ue000" not in text and "\ue001" not in text, text
    assert f"{HERE}:{_line_of(qa, 'llmir.gen')}" in text, text
    assert "max_tokens" in text and "parameter 'n'" in text and "give trace() its value" in text, text
    assert "--arg n=" in text, text
    assert p.trace(n=3, backend=fake) is not None


# --- 6. run_batch's own mistakes ----------------------------------------------------------------
def test_run_batch_given_one_dict(fake):
    def qa(s, question):
        s += question + llmir.gen("a", max_tokens=2)

    p = llmir.function(qa)
    with pytest.raises(ProgramArgumentError) as e:
        p.run_batch({"question": "x"}, backend=fake)
    text = str(e.value)
    assert "list" in text and "got dict" in text and "run(**args)" in text and "item 0" not in text, text
    with pytest.raises(ProgramArgumentError, match="got int"):
        p.run_batch(5, backend=fake)


def test_run_batch_unknown_keyword(fake):
    def qa(s, question):
        s += question + llmir.gen("a", max_tokens=2)

    p = llmir.function(qa)
    with pytest.raises(ProgramArgumentError) as e:
        p.run_batch([{"question": "x"}], foo=1, backend=fake)
    text = str(e.value)
    assert "run_batch() got an unknown keyword argument 'foo'" in text and "item 0" not in text, text
    assert "num_threads" in text, text
    with pytest.raises(ProgramArgumentError, match="generator_style"):
        p.run_batch([{"question": "x"}], stream=True, backend=fake)
    with pytest.raises(ProgramArgumentError) as e:
        p.run_batch([{"question": "x"}], temperature="hot", backend=fake)
    assert "run_batch(): " in str(e.value) and "item 0" not in str(e.value)
    # a program argument common to every item, and sampling defaults, still work
    states = p.run_batch([{}, {}], question="Q:", max_tokens=1, backend=fake)
    assert [st.text().startswith("Q:") for st in states] == [True, True]


# --- 7. names reserved for unnamed gens --------------------------------------------------------
@pytest.mark.parametrize("make", ["gen", "select", "gen_int"])
def test_names_of_unnamed_gens_are_reserved(fake, make):
    def prog(s):
        if make == "gen":
            s += "Q: " + llmir.gen("_gen1", max_tokens=2)
        elif make == "select":
            s += "Q: " + llmir.select("_gen12", choices=["a", "b"])
        else:
            s += "Q: " + llmir.gen_int("_gen2", max_tokens=2)

    with pytest.raises(DSLError) as e:
        llmir.function(prog).run(backend=fake)
    text = str(e.value)
    assert "reserved for unnamed gens" in text and "_gen1, _gen2" in text, text
    line = _line_of(prog, f'"{ {"gen": "_gen1", "select": "_gen12", "gen_int": "_gen2"}[make] }"')
    assert f"{HERE}:{line}" in text, text


def test_other_names_starting_with_gen_are_accepted():
    for name in ("_generated", "_genre", "_gen", "_gen1a", "gen1"):
        assert llmir.gen(name).name == name
        assert llmir.select(name, choices=["a"]).name == name


def test_a_regex_that_does_not_parse_is_an_error_at_its_gen_before_anything_runs(rt):
    with pytest.raises(llmir.DSLError, match=r"regex '\(a' does not parse: unclosed group") as e:
        llmir.gen("x", regex="(a")
    assert e.value.where is not None and e.value.where.line > 0

    @llmir.function
    def prog(s):
        s += "Q: hi\nA:" + llmir.gen("long", max_tokens=200, ignore_eos=True)
        s += "\nB:" + llmir.gen("bad", regex="[a-")

    before = rt.stats()["tokens_computed"]
    with pytest.raises(llmir.DSLError, match="does not parse"):
        prog.run(backend=rt)
    assert rt.stats()["tokens_computed"] == before  # the 200-token gen never ran


def test_a_literal_private_use_mark_in_traced_text_is_named_as_a_possible_cause():
    """The trace marks placeholders with U+E000 / U+E001; a program whose own constant text holds
    one is refused by trace() with a message that names that cause too (run() takes the text)."""

    @llmir.function
    def marked(s, q):
        s += "Q: " + q + "\ue000" + llmir.gen("a", max_tokens=2)

    with pytest.raises(FeatureNotSupportedError, match="the text itself holds U\\+E000 or U\\+E001"):
        marked.trace()

    @llmir.function
    def sliced(s, q):
        s += "Q: " + q[:3] + llmir.gen("a", max_tokens=2)

    with pytest.raises(FeatureNotSupportedError, match=r"placeholder of 'q\[:3\]'") as info:
        sliced.trace()
    assert "U+E000" not in str(info.value)  # a slice is its own placeholder: no literal mark to blame


# --- 8. text made from a traced value in ways no hook of the placeholder sees --------------------
def _repr(s, q):
    s += "Q: " + repr(q) + llmir.gen("a", max_tokens=2)


def _fstring_r(s, q):
    s += f"Q: {q!r}" + llmir.gen("a", max_tokens=2)


def _percent_r_tuple_variable(s, q):
    args = (q,)
    s += "Q: %r" % args + llmir.gen("a", max_tokens=2)  # noqa: UP031


def _percent_dict(s, q):
    s += "Q: %(q)s" % {"q": q} + llmir.gen("a", max_tokens=2)  # noqa: UP031


def _json_dumps(s, q):
    s += "Q: " + json.dumps({"q": q}) + llmir.gen("a", max_tokens=2)


def _ascii(s, q):
    s += "Q: " + ascii(q) + llmir.gen("a", max_tokens=2)


def _inner_slice(s, q):
    s += "Q: " + q[1:-1] + llmir.gen("a", max_tokens=2)  # "{q}": no mark was left


def _one_char(s, q):
    s += "Q: " + q[2] + llmir.gen("a", max_tokens=2)  # "q"


def _reversed(s, q):
    s += "Q: " + "".join(reversed(q)) + llmir.gen("a", max_tokens=2)


def _sliced_variable(s, q):
    s += "Q: " + q + llmir.gen("a", max_tokens=4)
    s += "\nAgain: " + s["a"][1:3]


def _stop_from_repr(s, q):
    s += "Q:" + llmir.gen("a", max_tokens=4, stop=[repr(q)])


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (_repr, "'q'"), (_fstring_r, "'q'"), (_percent_r_tuple_variable, "'q'"), (_percent_dict, "'q'"),
        (_json_dumps, "'q'"), (_ascii, "'q'"), (_inner_slice, "'q[1:-1]'"), (_one_char, "'q[2]'"),
        (_reversed, "'q[4]'"), (_sliced_variable, "'a[1:3]'"), (_stop_from_repr, "'q'"),
    ],
)  # fmt: skip
def test_trace_refuses_text_made_from_a_traced_value(fake, body, named):
    """repr() (``!r``, ``%r``), ascii() and json.dumps escape the marks of a traced value's
    placeholder, and a slice could cut both off: the text went into the IR as constant text
    (``'\\ue000{q}\\ue001'``, ``{q}``, ``q``) and the IR ignored the argument. Each is now the
    typed error that f-strings and ``str.join`` give, naming the program, the line and the value."""
    program = llmir.function(body)
    with pytest.raises(FeatureNotSupportedError) as e:
        program.trace()
    text = str(e.value)
    assert f"program '{body.__name__}'" in text and f"placeholder of {named}" in text, text
    assert "\ue000" not in text and "\\ue000" not in text, text
    line = _line_of(body, "Again" if body is _sliced_variable else '"Q')
    assert e.value.where is not None and e.value.where.line == line, text
    program.run(q="why", backend=fake)  # with the argument every str operation is fine


def test_control_flow_on_a_slice_of_a_traced_value_still_traces():
    @llmir.function
    def prog(s, q):
        s += "Q: " + q + "\nA:" + llmir.select("yes", choices=["Yes", "No"])
        if s["yes"][:3] == "Yes" or q[0] == "?":  # follows one path, as ``s["yes"] == "Yes"`` does
            s += "!"
        s += llmir.gen("a", max_tokens=2)

    assert "append" in print_ir(prog.trace())


# --- 9. a gen of max_tokens=0 that asks for logprobs ---------------------------------------------
def _zero_token_gens(s):
    s += "Q: What is 3 + 4?\nA:"
    s += llmir.gen("logprobs", max_tokens=0, return_logprob=True)
    s += llmir.gen("plain", max_tokens=0)
    s += llmir.gen("top", max_tokens=0, top_logprobs_num=3)


class _NoLogprobsForNothing(FakeBackend):
    """Answers a gen that generated nothing without logprobs at all (None), as the OpenAI
    backend does for max_tokens 0 (its API reports logprobs per generated token only)."""

    def _run(self, request, on_chunk):
        result = super()._run(request, on_chunk)
        for step in result.steps:
            if not step.token_ids:
                step.logprobs = None
        return result


@pytest.fixture(params=["fake", "no_logprobs"])
def zero_backend(request, fake):
    if request.param == "fake":
        yield fake
        return
    backend = _NoLogprobsForNothing()
    yield backend
    backend.pool.shutdown(wait=True)


def test_zero_tokens_with_top_logprobs_on_a_backend_that_reports_none(zero_backend):
    """A gen of max_tokens=0 with top_logprobs_num=k reports the k most likely next tokens as the
    one entry of output_top_logprobs (the embedded engine, SGLang; cot_decoding reads [0]). A
    backend that reports none (OpenAI's API, this fake) left the key out: the program read
    nothing (a KeyError, or an IndexError on []). The gen now fails with a typed error saying so
    and what to do instead."""
    program = llmir.function(_zero_token_gens)
    for passes in (None, ""):  # fused into one chain or call by call
        with pytest.raises(llmir.GenerationNotSupportedError) as e:
            program.run(backend=zero_backend, passes=passes)
        text = str(e.value)
        assert f"{HERE}:{_line_of(_zero_token_gens, 'top_logprobs_num=3')}" in text, text
        assert "gen/select 'top'" in text and "max_tokens=0, top_logprobs_num=3" in text, text
        assert "output_top_logprobs" in text and "max_tokens=1" in text, text


def _zero_token_gens_no_top(s):
    s += "Q: What is 3 + 4?\nA:"
    s += llmir.gen("logprobs", max_tokens=0, return_logprob=True)
    s += llmir.gen("plain", max_tokens=0)


def test_zero_tokens_with_token_logprobs_have_an_empty_list(zero_backend):
    """A gen of 0 tokens that asks for token logprobs has ``output_token_logprobs == []`` (no token,
    no logprob) on every backend; one that answers with none at all left the key out."""
    for passes in (None, ""):
        state = llmir.function(_zero_token_gens_no_top).run(backend=zero_backend, passes=passes)
        meta = state.get_meta_info("logprobs")
        assert state["logprobs"] == "" and meta["output_token_logprobs"] == [] and meta["logprobs"] == []
        assert "output_top_logprobs" not in meta
        assert "output_token_logprobs" not in state.get_meta_info("plain")  # it asked for none


def test_zero_tokens_with_logprobs_on_the_engine(rt):
    state = llmir.function(_zero_token_gens).run(backend=rt)
    top, lps, plain = (state.get_meta_info(n) for n in ("top", "logprobs", "plain"))
    assert [state[n] for n in ("top", "logprobs", "plain")] == ["", "", ""]
    assert top["output_token_logprobs"] == [] and len(top["output_top_logprobs"]) == 1
    assert len(top["output_top_logprobs"][0]) == 3
    assert lps["output_token_logprobs"] == [] and "output_top_logprobs" not in lps
    assert "output_token_logprobs" not in plain
