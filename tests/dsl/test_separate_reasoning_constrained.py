"""A constrained gen inside ``separate_reasoning``: the constraint covers the answer, the model
reasons freely up to the end tag (SGLang's reasoner grammar), on the bundled model, passes on and
off; a constraint that spells the end tag itself still covers the whole output.

The bundled model writes no ``<think>`` tags. With ``deepseek-r1`` it therefore never ends its
reasoning (the answer is empty, ``max_tokens`` ends it); for an answer, a test format whose end
tag is ``JSON:`` (the model writes ``Person JSON:\\n{...}``) is registered for these tests."""

from __future__ import annotations

import json

import pytest

import llmir_lang as llmir
from llmir_lang.dsl.lowering import gen_step
from llmir_lang.dsl.testing import bundled_model_available
from llmir_lang.ir.reasoning import FORMATS, ReasoningFormat, split_reasoning
from llmir_lang.models.tiny_tasks import SCHEMAS

pytestmark = pytest.mark.skipif(not bundled_model_available(), reason="needs the bundled model")

TEXT = "Bob Marley is 41 and works as a pilot in Oslo. He is married."


@pytest.fixture(scope="module")
def runtime():
    import torch

    torch.set_num_threads(1)
    rt = llmir.Runtime(kv_memory="64MB")
    yield rt
    rt.shutdown()


@pytest.fixture()
def json_tag(monkeypatch):
    monkeypatch.setitem(FORMATS, "test-json-tag", ReasoningFormat("<think>", "JSON:", forced=True))
    return "test-json-tag"


def _raw(runtime, meta) -> str:
    return runtime.get_tokenizer().decode(meta["token_ids"])


@pytest.mark.parametrize("passes", [None, ""])
def test_a_schema_constrains_the_answer_after_the_reasoning(runtime, json_tag, passes):
    @llmir.function
    def extract(s, text):
        s += "Text: " + text + "\nPerson"
        s += llmir.separate_reasoning(
            llmir.gen("rec", max_tokens=80, json_schema=SCHEMAS["person"]), model_type=json_tag
        )
        s += "\nDone."

    st = extract.run(text=TEXT, backend=runtime, passes=passes)
    raw = _raw(runtime, st.get_meta_info("rec"))
    assert raw.startswith(" JSON:\n{")  # free up to the tag, then the record
    assert (st["rec_reasoning_content"], st["rec"]) == split_reasoning(json_tag, raw)
    record = json.loads(st["rec"])
    assert list(record) == list(SCHEMAS["person"]["properties"]) and record["age"] == 41
    assert st.text().endswith("Person" + st["rec"] + "\nDone.")


@pytest.mark.parametrize("passes", [None, ""])
def test_choices_and_a_regex_after_the_reasoning(runtime, json_tag, passes):
    @llmir.function
    def pick(s, text):
        s += "Text: " + text + "\nPerson"
        s += llmir.separate_reasoning(llmir.gen("yn", max_tokens=24, choices=["yes", "no"]), json_tag)

    @llmir.function
    def count(s):
        s += "Q: What is 12 + 5?\nA: "
        s += llmir.separate_reasoning(llmir.gen("x", max_tokens=12, regex=r"\d+"), model_type="deepseek-r1")

    st = pick.run(text=TEXT, backend=runtime, passes=passes)
    assert st["yn"] in ("yes", "no") and _raw(runtime, st.get_meta_info("yn")).startswith(" JSON:")
    # deepseek-r1: the model never writes </think>, so it reasons until max_tokens, freely (the
    # regex would have made it write digits and stop)
    st = count.run(backend=runtime, passes=passes)
    raw = _raw(runtime, st.get_meta_info("x"))
    assert st.get_meta_info("x")["finish_reason"] == "length" and not raw.isdigit()
    assert (st["x_reasoning_content"], st["x"]) == (raw.strip(), "")


def test_a_constraint_that_spells_the_end_tag_covers_the_whole_output():
    whole = gen_step("a", {"regex": r"<think>[a-z ]{1,8}</think> ?[a-z]{1,5}", "reasoning": "deepseek-r1"})
    assert whole.constraint.reasoning is None
    gated = gen_step("a", {"dtype": "int", "reasoning": "qwen3"}).constraint
    assert (gated.reasoning.start, gated.reasoning.end, gated.reasoning.forced) == (
        "<think>",
        "</think>",
        False,
    )
    forced = gen_step("a", {"choices": ("x", "y"), "reasoning": "minimax-append-think"}).constraint
    assert forced.reasoning.forced  # its output begins inside the reasoning (the parser adds <think>)
    assert gen_step("a", {"regex": "x"}).constraint.reasoning is None  # no separate_reasoning
