"""``from_sglang``: SGLang programs (its pure-Python frontend, ``sglang==0.4.10.post2``) run on
llmir's embedded engine and match the same programs written in the llmir DSL, text and variables.

Runs on the bundled model when installed, else on a random-weight model: greedy outputs of the two
versions must be equal either way; the task checks (the answer is right) need the trained model.
"""

from __future__ import annotations

import sys

import pytest
import torch

import llmir_lang as llmir
from llmir_lang.dsl.sglang_interop import SGLangConversionError, SGLangNotInstalledError, from_sglang
from llmir_lang.dsl.testing import bundled_model_available
from llmir_lang.ir import print_ir
from llmir_lang.models import tiny_tasks

torch.set_num_threads(1)
TRAINED = bundled_model_available()
try:
    import sglang as sgl
except ImportError as e:  # the optional extra llmir_lang[sglang]
    sgl = None
    WHY = f"SGLang's frontend is not installed ({e}); pip install 'llmir_lang[sglang]'"
needs_sglang = pytest.mark.skipif(sgl is None, reason=WHY if sgl is None else "")

SHOTS = "Q: What is 3 + 4?\nA: 7\nQ: What is 10 - 2?\nA: 8\n"


def test_missing_sglang_is_a_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang.lang", None)  # makes the import fail
    with pytest.raises(SGLangNotInstalledError, match=r"llmir_lang\[sglang\]"):
        from_sglang(object())


# --- the same programs, written for SGLang and for llmir -----------------------------------
if sgl is not None:

    @sgl.function
    def sgl_qa(s, question):
        s += SHOTS
        s += "Q: " + question + "\nA: "
        s += sgl.gen("answer", max_tokens=8, stop="\n")

    @sgl.function
    def sgl_chat(s, q1, q2="And what is 2 + 3?"):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(q1)
        s += sgl.assistant(sgl.gen("a1", max_tokens=12))
        with s.user():
            s += q2
        s += sgl.assistant_begin() + sgl.gen("a2", max_tokens=12) + sgl.assistant_end()

    @sgl.function
    def sgl_branching(s, facts, question):
        s += tiny_tasks.few_shot_prompt([], question, facts)
        s += sgl.select("verdict", choices=list(tiny_tasks.QA_ANSWER_CHOICES))
        if s["verdict"] == tiny_tasks.QA_ANSWER_CHOICES[0]:  # control flow on a generated value
            s += "\nQ: What is 6 times 2?\nA: " + sgl.gen_int("n", max_tokens=4)
        else:
            s += "\nQ: What is 1 + 1?\nA: " + sgl.gen("n", choices=["2", "3"])

    @sgl.function
    def sgl_fork_scope(s, text):
        s += tiny_tasks.extraction_prompt(text, "person")
        with s.var_scope("json"):
            s += '{"name":"' + sgl.gen("name", max_tokens=12, stop='"') + '","age":'
            s += sgl.gen("age", max_tokens=4, regex=r"[0-9]+")
        forks = s.fork(2)
        forks += lambda i: f"\nQ{i}:" + sgl.gen("note", max_tokens=3, stop="\n")
        forks[1] += "!"
        forks.join()
        s += "\nA: " + sgl.gen("tail", max_tokens=2, stop="\n", temperature=0.0, top_k=-1)


@llmir.function(name="sgl_qa")
def llmir_qa(s, question):
    s += SHOTS
    s += "Q: " + question + "\nA: "
    s += llmir.gen("answer", max_tokens=8, stop="\n")


@llmir.function(name="sgl_chat")
def llmir_chat(s, q1, q2="And what is 2 + 3?"):
    s += llmir.system("You are a helpful assistant.")
    s += llmir.user(q1)
    s += llmir.assistant(llmir.gen("a1", max_tokens=12))
    with s.user():
        s += q2
    s += llmir.assistant_begin() + llmir.gen("a2", max_tokens=12) + llmir.assistant_end()


@llmir.function
def llmir_branching(s, facts, question):
    s += tiny_tasks.few_shot_prompt([], question, facts)
    s += llmir.select("verdict", list(tiny_tasks.QA_ANSWER_CHOICES))
    if s["verdict"] == tiny_tasks.QA_ANSWER_CHOICES[0]:
        s += "\nQ: What is 6 times 2?\nA: " + llmir.gen_int("n", max_tokens=4)
    else:
        s += "\nQ: What is 1 + 1?\nA: " + llmir.select("n", ["2", "3"])


@llmir.function
def llmir_fork_scope(s, text):
    s += tiny_tasks.extraction_prompt(text, "person")
    with s.var_scope("json"):
        s += '{"name":"' + llmir.gen("name", max_tokens=12, stop='"') + '","age":'
        s += llmir.gen("age", max_tokens=4, regex=r"[0-9]+")
    forks = s.fork(2)
    forks += lambda i: f"\nQ{i}:" + llmir.gen("note", max_tokens=3, stop="\n")
    second = forks[1]  # llmir's ForkGroup has no item assignment (SGLang's has: forks[1] += ...)
    second += "!"
    forks.join()
    s += "\nA: " + llmir.gen("tail", max_tokens=2, stop="\n", temperature=0.0)


def _same(a, b) -> None:
    assert a.error() is None and b.error() is None, (a.error(), b.error())
    assert a.text() == b.text()
    assert a.variables() == b.variables()
    assert a.messages() == b.messages()


@needs_sglang
def test_converted_program_traces_to_the_same_ir():
    # Structure, with no model: the SGLang body records exactly the llmir program's IR.
    assert print_ir(from_sglang(sgl_qa).trace()) == print_ir(llmir_qa.trace())
    assert print_ir(from_sglang(sgl_chat).trace()) == print_ir(llmir_chat.trace())
    program = from_sglang(sgl_qa)
    assert program.arg_names == ["question"] and program.name == "sgl_qa"


@needs_sglang
def test_qa_and_multi_turn_chat_match_the_llmir_versions(rt):
    a = from_sglang(sgl_qa).run(question="What is 7 + 5?", backend=rt)
    _same(a, llmir_qa.run(question="What is 7 + 5?", backend=rt))
    if TRAINED:
        assert a["answer"] == "12"
    a = from_sglang(sgl_chat).run(q1="What is 2 + 2?", backend=rt)
    _same(a, llmir_chat.run(q1="What is 2 + 2?", backend=rt))
    assert [m["role"] for m in a.messages()] == ["system", "user", "assistant", "user", "assistant"]


@needs_sglang
def test_select_and_control_flow_match(rt):
    facts = "Ada lives in Paris."
    verdicts = []
    for question in ("Does Ada live in Paris?", "Does Ada live in Rome?"):
        a = from_sglang(sgl_branching).run(facts=facts, question=question, backend=rt)
        _same(a, llmir_branching.run(facts=facts, question=question, backend=rt))
        meta = a.get_meta_info("verdict")
        assert meta["choices"][meta["picked"]] == a["verdict"]
        verdicts.append((a["verdict"], a["n"]))
    if TRAINED:  # both branches of the Python `if` ran
        assert verdicts == [("True", "12"), ("False", "2")]


@needs_sglang
def test_var_scope_fork_join_and_constraints_match(rt):
    text = "Meet Dreathbrend Klyro. She is 29 years old. She lives in Coholm."
    a = from_sglang(sgl_fork_scope).run(text=text, backend=rt)
    _same(a, llmir_fork_scope.run(text=text, backend=rt))
    assert isinstance(a["note"], list) and len(a["note"]) == 2
    assert a["json"].startswith('{"name":"') and a["age"].isdigit()


@needs_sglang
def test_run_batch_bind_and_sampling_defaults(rt):
    questions = [{"question": f"What is {i} + {i}?"} for i in range(4)]
    a = from_sglang(sgl_qa).run_batch(questions, backend=rt, max_new_tokens=4)
    b = llmir_qa.run_batch(questions, backend=rt, max_new_tokens=4)
    assert [st["answer"] for st in a] == [st["answer"] for st in b]
    if TRAINED:
        assert [st["answer"] for st in a] == [str(2 * i) for i in range(4)]
    bound = from_sglang(sgl_chat.bind(q2="What is 1 + 1?"))
    _same(bound.run(q1="Hi", backend=rt), llmir_chat.run(q1="Hi", q2="What is 1 + 1?", backend=rt))


@needs_sglang
def test_unsupported_nodes_are_typed_errors(fake, rt):
    from sglang.lang.choices import unconditional_likelihood_normalized

    def program(body):
        return from_sglang(sgl.function(body))

    def image(s):
        s += sgl.image("cat.png")

    def several(s):
        s += "x" + sgl.gen("a", max_tokens=2, n=2)

    def method(s):
        s += "Q: sky? A:" + sgl.select("a", ["x", "y"], choices_method=unconditional_likelihood_normalized)

    def hot(s):
        s += sgl.select("a", ["x", "y"], temperature=0.7)

    # SGLang's third method converts too (it scores the choices without the prompt: a real engine)
    assert program(method).run(backend=rt)["a"] in ("x", "y")
    cases = [(image, "SglImage"), (several, "n=2"), (hot, "temperature")]
    for body, what in cases:
        with pytest.raises(SGLangConversionError, match=what) as info:
            program(body).run(backend=fake)
        assert "test_sglang_interop.py" in str(info.value)  # points at the user's line
    with pytest.raises(SGLangConversionError, match="@sgl.function"):
        from_sglang(llmir_qa)
