"""Small user mistakes: each is a typed error that names the cause and what to do, at the user's
line where the library reports one (not a silent no-op, a plain AttributeError or TypeError)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

import llmir_lang as llmir
from llmir_lang.dsl import DSLError, FeatureNotSupportedError, ProgramArgumentError, ProgramDefinitionError
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


# --- 2. parameters named like run()'s own keywords ---------------------------------------------
def _ask(s, stream):
    s += "Q: (" + stream + ")\nA: " + llmir.gen("a", max_tokens=2)


def test_parameter_named_like_a_run_keyword(fake):
    ask = llmir.function(_ask)
    with pytest.raises(ProgramArgumentError) as e:
        ask.run(stream="rivers", backend=fake)
    text = str(e.value)
    assert "program '_ask'" in text and "'stream'" in text and "rename" in text, text
    assert "bind(stream=...)" in text and "missing" not in text, text
    # the required parameter left unset is the same mistake, named the same way
    with pytest.raises(ProgramArgumentError, match="keyword argument of run"):
        ask.run(backend=fake)
    with pytest.raises(ProgramArgumentError, match=r"arun\(\)"):
        asyncio.run(ask.arun(stream="rivers", backend=fake))
    # the paths that can pass it still do: bind, positionally, run_batch's items
    assert ask.bind(stream="rivers").run(backend=fake).text().startswith("Q: (rivers)")
    assert ask.bind(stream="rivers").run(backend=fake, stream=True).text().startswith("Q: (rivers)")
    assert ask.run("rivers", backend=fake).text().startswith("Q: (rivers)")
    assert ask.run_batch([{"stream": "rivers"}], backend=fake)[0].text().startswith("Q: (rivers)")


def test_parameter_with_default_named_like_a_run_keyword(fake):
    def prog(s, passes="x", backend="y"):
        s += passes + backend + llmir.gen("a", max_tokens=2)

    p = llmir.function(prog)
    with pytest.raises(ProgramArgumentError) as e:
        p.run(passes="canonicalize", backend=fake)
    assert "parameters 'passes', 'backend' have" in str(e.value)
    with pytest.raises(ProgramArgumentError, match="parameter 'backend' has"):
        p.run(backend=fake)  # ambiguous: run()'s backend or the program's?
    # once bound, run()'s keywords are run()'s; unset, the parameters take their defaults
    assert p.bind(backend="Y").run(backend=fake).text().startswith("xY")
    assert p.bind(backend="Y", passes="X").run(backend=fake, passes="").text().startswith("XY")
    with pytest.raises(ProgramArgumentError, match=r"trace\(\)"):
        p.trace(backend=fake)
    assert p.trace().functions[0].name == "prog"
    assert p.cache(backend=fake) == "xy"  # cache() traces it (defaults and all) on its own backend


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
        s += "Q: " + q[:3] + llmir.gen("a", max_tokens=2)  # part of a placeholder, no literal mark

    with pytest.raises(FeatureNotSupportedError, match="part of a traced placeholder") as info:
        sliced.trace()
    assert "U+E000" in str(info.value)  # the text cannot tell a slice from a literal mark
