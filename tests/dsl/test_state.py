"""ProgramState semantics on a fake backend: text, roles, messages, variables, forks, trace."""

from __future__ import annotations

import pytest
from fake_backend import fake_generate

import llmir_lang as llmir
from llmir_lang.dsl.errors import FeatureNotSupportedError
from llmir_lang.executor.backend import GenStep
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.ir import print_ir
from llmir_lang.models import tiny_tasks


def _gen_text(prompt: str, **params) -> str:
    return fake_generate(prompt, GenStep(None, SamplingParams(**params)))[0]


def test_text_gen_and_meta(fake):
    @llmir.function
    def f(s, topic):
        s += "About " + topic + ":"
        s += llmir.gen("a", max_tokens=4, ignore_eos=True, return_logprob=True)

    st = f.run(topic="cats", backend=fake)
    expected = _gen_text("About cats:", max_new_tokens=4, ignore_eos=True)
    assert st["a"] == expected
    assert st.text() == "About cats:" + expected
    meta = st.get_meta_info("a")
    assert meta["completion_tokens"] == 4 and meta["finish_reason"] == "length"
    assert meta["logprobs"] == [-0.5] * 4
    assert "a" in st and "b" not in st


def test_roles_render_through_chat_template_and_messages(fake):
    @llmir.function
    def chat(s):
        s += llmir.system("Be brief.")
        with s.user():
            s += "Hi"
        s += llmir.assistant(llmir.gen("r1", max_tokens=3))
        s += llmir.user_begin() + "More" + llmir.user_end()
        s += llmir.assistant_begin()
        s += llmir.gen("r2", max_tokens=3)
        s += llmir.assistant_end()

    st = chat.run(backend=fake)
    msgs = st.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "Be brief." and msgs[2]["content"] == st["r1"]
    # the text is exactly what the backend's own template renders for those messages
    assert st.text() == fake.apply_chat_template(msgs)


def test_var_scope_and_setitem(fake):
    @llmir.function
    def f(s):
        s += "{"
        with s.var_scope("body"):
            s += '"name": "' + llmir.gen("name", max_tokens=2, stop='"') + '"'
        s += "}"
        s["extra"] = 42

    st = f.run(backend=fake)
    assert st["body"] == '"name": "' + st["name"] + '"'
    assert st.text() == "{" + st["body"] + "}"
    assert st["extra"] == 42
    assert st.variables()["extra"] == 42


def test_fork_gather_join_in_one_segment(fake):
    @llmir.function
    def sot(s):
        s += "Outline of a long essay about many things, in parts:\n"
        forks = s.fork(3)
        forks += lambda i: f"Part {i}:" + llmir.gen("para", max_tokens=3, stop="\n")
        forks.join()
        s += "Summary:" + llmir.gen("summary", max_tokens=3)

    st = sot.run(backend=fake)
    base = "Outline of a long essay about many things, in parts:\n"
    assert st["para"] == [_gen_text(base + f"Part {i}:", max_new_tokens=3, stop=["\n"]) for i in range(3)]
    assert st.text() == base + "Summary:" + st["summary"]  # gather leaves the parent's text
    stats = st.run_stats()
    assert stats["segments"] == 1  # fork, join and summary: no sync point
    assert stats["prefills"] == 1  # the forked prefix, once, before the branches
    # the prefill, then the three branch heads together, then the summary after the join
    assert fake.requests[0].pin and fake.requests[0].prompt == base
    assert sorted(r.prompt for r in fake.requests[1:4]) == [base + f"Part {i}:" for i in range(3)]
    assert fake.requests[4].prompt.endswith("Summary:")


def test_fork_list_values_branch_access_concat_and_copy(fake):
    @llmir.function
    def f(s):
        s += "Start here with some shared text.\n"
        forks = s.fork(2)
        forks += ["A:", "B:"]
        forks += llmir.gen("x", max_tokens=2, stop="\n")
        first = forks[0]["x"]  # a sync point inside the program
        forks.join(mode="concate_and_append")
        s += "|" + first
        c = s.copy()
        c += " copy"
        s["copy_text"] = c.text()

    st = f.run(backend=fake)
    x0 = _gen_text("Start here with some shared text.\nA:", max_new_tokens=2, stop=["\n"])
    x1 = _gen_text("Start here with some shared text.\nB:", max_new_tokens=2, stop=["\n"])
    assert st["x"] == [x0, x1]
    assert st.text() == f"Start here with some shared text.\nA:{x0}B:{x1}|{x0}"
    assert st["copy_text"] == st.text() + " copy"


def test_anonymous_gens_and_concat_expressions(fake):
    @llmir.function
    def f(s):
        s += "Q: one\nA:" + llmir.gen(max_tokens=2) + "\nQ: two\nA:" + llmir.gen("b", max_tokens=2)

    st = f.run(backend=fake)
    assert "b" in st and all(not k.startswith("_gen") for k in st.variables())
    assert st.text().endswith(st["b"])


def test_trace_records_params_vars_and_roles():
    @llmir.function
    def f(s, question, style="short"):
        s += llmir.user("Q: " + question)
        s += llmir.assistant(llmir.gen("answer", max_tokens=8))
        s += "Again: " + s["answer"]
        forks = s.fork(2)
        forks += llmir.select("pick", ["yes", "no"])
        forks.join()

    text = print_ir(f.trace())
    assert "func @f(%question: text)" in text
    assert "append" in text and "var %" in text and "fork" in text and "join" in text
    assert "role.begin" in text and "select" in text
    assert 'choices = ["yes", "no"]' in text
    # an argument that is given becomes constant text
    assert '"Q: why"' in print_ir(f.trace(question="why"))


def test_trace_refuses_a_parameter_formatted_into_text(fake):
    """An f-string / str.format / % of a traced parameter would record the placeholder text and
    ignore the argument: trace raises a typed error naming the parameter and the + way."""

    @llmir.function
    def by_fstring(s, question):
        s += f"Q: {question}\nA:" + llmir.gen("answer", max_tokens=4)

    @llmir.function
    def by_format(s, question):
        s += "Q: {}\nA:".format(question)  # noqa: UP032

    @llmir.function
    def by_percent(s, question):
        s += "Q: %s\nA:" % question  # noqa: UP031

    @llmir.function
    def by_percent_tuple(s, question):
        s += "Q: %s\nA: %s" % (question, "yes")  # noqa: UP031

    for program in (by_fstring, by_format, by_percent, by_percent_tuple):
        with pytest.raises(FeatureNotSupportedError) as info:
            program.trace()
        message = str(info.value)
        assert "parameter 'question'" in message and "'{question}'" in message
        assert '"Q: " + question' in message
        assert info.value.program == program.name and info.value.where.line > 0
    # a given argument is a real str: constant text, f-string or not
    assert '"Q: why\\nA:"' in print_ir(by_fstring.trace(question="why"))

    @llmir.function
    def reads_a_variable(s):
        s += "Q: why\nA:" + llmir.gen("answer", max_tokens=4)
        s += f"Again: {s['answer']}"

    with pytest.raises(FeatureNotSupportedError, match=r"variable 'answer'.*\+ s\['answer'\]"):
        reads_a_variable.trace()

    @llmir.function
    def by_join(s, question):
        s += "".join(["Q: ", question, "\nA:"]) + llmir.gen("answer", max_tokens=4)

    @llmir.function
    def by_method(s, question):
        s += "Q: " + question.strip().upper()

    @llmir.function
    def by_slice(s, question):
        s += "Q: " + question[1:]

    @llmir.function
    def by_tuple_variable(s, question):
        args = (question, "yes")
        s += "Q: %s\nA: %s" % args  # noqa: UP031

    @llmir.function
    def as_choice(s, question):
        s += "Pick:" + llmir.select("pick", choices=[question, question.lower(), "no"])

    @llmir.function
    def as_stop(s, question):
        s += "Q:" + llmir.gen("answer", max_tokens=4, stop=[question.title()])

    expected = {
        by_join: ("text", "'question'"), by_method: ("text", "'QUESTION'"), by_slice: ("text", "'question[1:]'"),
        by_tuple_variable: ("text", "'question'"), as_choice: ("select", "'question'"),
        as_stop: ("gen", "'Question'"),
    }  # fmt: skip
    for program, (kind, named) in expected.items():
        with pytest.raises(FeatureNotSupportedError) as info:
            program.trace()
        message = str(info.value)
        assert f"recorded by a {kind} op" in message and named in message, message
        assert "\ue000" not in message and '"Q: " + question' in message
        assert info.value.program == program.name and info.value.where.line > 0
        program.run(question="why", backend=fake)  # with the argument every str operation is fine

    @llmir.function
    def by_str(s, number):
        s += "n = " + str(number)  # str() keeps the reference (a number in run())

    assert "append %1, %number" in print_ir(by_str.trace())


def test_trace_keeps_a_parameter_joined_with_plus(fake):
    shots = [("What is 3 + 4?", "7")]

    @llmir.function
    def qa(s, question):
        s += tiny_tasks.few_shot_prompt(shots, question)  # joins the question with +
        s += llmir.gen("answer", max_tokens=4)

    text = print_ir(qa.trace())
    assert "func @qa(%question: text)" in text
    assert "append %1, %question" in text and "{question}" not in text
    assert '"Q: What is 3 + 4?\\nA: 7\\nQ: "' in text
    # run with the argument: the same text an f-string would have made
    st = qa.run(question="What is 7 + 5?", backend=fake)
    assert st.text() == f"Q: What is 3 + 4?\nA: 7\nQ: What is 7 + 5?\nA: {st['answer']}"


def test_run_takes_an_fstring_of_a_parameter(fake):
    @llmir.function
    def f(s, question):
        s += f"Q: {question}\nA:" + llmir.gen("answer", max_tokens=4)
        s += f" ({s['answer']!s:.2})" + " %s" % question  # noqa: UP031

    st = f.run(question="why", backend=fake)
    answer = st["answer"]
    assert st.text() == f"Q: why\nA:{answer} ({answer:.2}) why"


def test_composition_calls_a_program_inside_another(fake):
    @llmir.function
    def inner(s, word):
        s += "[" + word + "]"

    @llmir.function
    def outer(s):
        s += "x"
        inner(s, "y")
        s += "z"

    assert outer.run(backend=fake).text() == "x[y]z"


def test_trace_refuses_variables_it_has_no_value_for():
    """A var_scope's text, an item of a fork's joined list and get_meta_info have no value in the
    IR: trace used to record the text "{json}", "{" or "{}" for them, so the traced IR differed
    from what run() does. Each is now a typed error naming the variable."""

    @llmir.function
    def scoped(s):
        with s.var_scope("json"):
            s += "{" + llmir.gen("x", max_tokens=4) + "}"
        s += "Again: " + s["json"]

    @llmir.function
    def joined_item(s):
        forks = s.fork(2)
        forks += lambda i: "Idea:" + llmir.gen("idea", max_tokens=4)
        forks.join()
        s += "Best: " + s["idea"][0]

    @llmir.function
    def meta_text(s):
        s += "Q:" + llmir.gen("a", max_tokens=4)
        s += str(s.get_meta_info("a"))

    with pytest.raises(FeatureNotSupportedError, match=r"variable 'json'.*traced"):
        scoped.trace()
    with pytest.raises(FeatureNotSupportedError, match=r"variable 'idea'.*indexed"):
        joined_item.trace()
    with pytest.raises(FeatureNotSupportedError, match=r"meta info of a"):
        meta_text.trace()

    @llmir.function
    def meta_read_only(s):
        s += "Q:" + llmir.gen("a", max_tokens=4)
        print(s.get_meta_info("a"))  # shown, not appended
        if s.get_meta_info("a").get("finish_reason") == "length":  # nothing of it enters the IR
            s += "!"

    assert meta_read_only.trace() is not None

    @llmir.function
    def reads_after_run(s):
        with s.var_scope("json"):
            s += "{" + llmir.gen("x", max_tokens=4) + "}"

    assert reads_after_run.trace() is not None  # a var_scope that is not read back still traces


def test_trace_refuses_arithmetic_on_a_parameter():
    """``str(n + 1)`` of a traced parameter recorded the repr of ``Concat([n, 1])`` as text."""

    @llmir.function
    def counts(s, n):
        s += "Next: " + str(n + 1)

    with pytest.raises(FeatureNotSupportedError, match=r"parameter 'n' is used in arithmetic"):
        counts.trace()
    assert '"Next: 4"' in print_ir(counts.trace(n=3))

    @llmir.function
    def compares(s, n):
        if n > 2:  # raised a bare TypeError (a str against an int)
            s += "big"

    with pytest.raises(FeatureNotSupportedError, match=r"compared with a number \(n > 2\)"):
        compares.trace()
    assert '"big"' in print_ir(compares.trace(n=3))
