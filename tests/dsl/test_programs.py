"""The shapes of SGLang's ``test_programs.py``, run on the embedded engine.

They run on the bundled model (``llmir-tiny``) when it is installed, else on a random-weight model
with its tokenizer. Structural asserts always hold; task asserts (the answer is right) run only on
the trained model and only for the tasks it was trained on (``models/tiny_tasks.py``). Every
program is also run with all passes on and with none (call by call): greedy outputs must match.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

import llmir_lang as llmir
from llmir_lang.dsl import GenerationNotSupportedError
from llmir_lang.dsl.testing import bundled_model_available
from llmir_lang.models import tiny_tasks

torch.set_num_threads(1)
TRAINED = bundled_model_available()
IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?)\.){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"


def run_both(program, rt, **kwargs):
    """Run with the default pipeline and call by call; greedy outputs must be equal."""
    try:
        on = program.run(backend=rt, **kwargs)
        off = program.run(backend=rt, passes="", **kwargs)
    except GenerationNotSupportedError as e:
        pytest.xfail(f"the backend does not support this constraint yet: {e}")
    assert on.text() == off.text()
    assert on.variables() == off.variables()
    return on


# --- programs -------------------------------------------------------------------------------
ARITH_SHOTS = [("What is 3 + 4?", "7"), ("What is 10 - 2?", "8"), ("What is 6 times 2?", "12")]


@llmir.function
def few_shot_qa(s, question):
    s += tiny_tasks.few_shot_prompt(ARITH_SHOTS, question)
    s += llmir.gen("answer", max_tokens=6, stop="\n")


@llmir.function
def multi_turn(s, q1, q2):
    s += llmir.system("You are a helpful assistant.")
    s += llmir.user(q1)
    s += llmir.assistant(llmir.gen("a1", max_tokens=12))
    s += llmir.user(q2)
    s += llmir.assistant(llmir.gen("a2", max_tokens=12))


@llmir.function
def fact_check(s, facts, question):
    s += tiny_tasks.few_shot_prompt([], question, facts)
    s += llmir.select("answer", list(tiny_tasks.QA_ANSWER_CHOICES))


@llmir.function
def decode_int(s, question):
    s += tiny_tasks.few_shot_prompt(ARITH_SHOTS, question)
    s += llmir.gen_int("answer", max_tokens=4)


@llmir.function
def decode_json(s, text):
    s += tiny_tasks.extraction_prompt(text, "person")
    # Constant text ends where a training token ends ('":"' is one token), so the model continues
    # from a tokenization it has seen.
    with s.var_scope("json_output"):
        s += '{"name":"' + llmir.gen("name", max_tokens=12, stop='"')
        s += '","age":' + llmir.gen("age", max_tokens=4, stop=",")
        s += ',"city":"' + llmir.gen("city", max_tokens=12, stop='"') + '"}'


@llmir.function
def expert_answer(s, question):
    s += "Question: " + question + "\n"
    s += "A good person to answer this is" + llmir.gen("expert", max_tokens=6, stop=[".", "\n"]) + ".\n"
    s += "For instance," + s["expert"] + " would say: " + llmir.gen("answer", max_tokens=8, stop="\n")


@llmir.function
def tool_use(s):
    s += "Write an addition.\nExpression: "
    s += llmir.gen("expression", max_tokens=8, regex=r"[1-9][0-9]? \+ [1-9][0-9]?")
    s += "\nResult: " + str(eval(s["expression"]))  # the program computes with the generated text


@llmir.function
def react(s, question):
    s += "Question: " + question + "\n"
    for i in range(3):
        s += f"Thought {i}:" + llmir.gen(f"thought_{i}", max_tokens=6, stop="\n") + "\n"
        s += f"Action {i}: " + llmir.select(f"action_{i}", ["Search", "Finish"]) + "\n"
        if s[f"action_{i}"] == "Finish":
            break
        s += f"Observation {i}: nothing found.\n"


@llmir.function
def parallel_decoding(s, topic):
    s += "Here are five ideas about " + topic + ", one per line.\n"
    forks = s.fork(5)
    forks += lambda i: f"Idea {i + 1}:" + llmir.gen("idea", max_tokens=6, stop="\n") + "\n"
    forks.join()
    s += "In short:" + llmir.gen("summary", max_tokens=8, stop="\n")


@llmir.function
def ip_address(s):
    s += "The IP address of the local host is " + llmir.gen("ip", max_tokens=20, regex=IP_REGEX)


@llmir.function
def typed_values(s):
    s += "Age: " + llmir.gen("age", dtype=int, max_tokens=6)
    s += "\nPrice: " + llmir.gen("price", dtype=float, max_tokens=12)
    s += "\nMarried: " + llmir.gen("married", dtype=bool, max_tokens=6)


@llmir.function
def min_tokens(s):
    s += "Say something.\n" + llmir.gen("text", min_tokens=6, max_tokens=8)


# --- tests ----------------------------------------------------------------------------------
def test_few_shot_qa(rt):
    questions = [
        ("What is 2 + 5?", "7"),
        ("What is 9 - 4?", "5"),
        ("What is 3 times 3?", "9"),
        ("What is 12 + 30?", "42"),
    ]
    states = few_shot_qa.run_batch([{"question": q} for q, _ in questions], backend=rt)
    assert all(st.error() is None for st in states)
    assert all("\n" not in st["answer"] for st in states)
    assert run_both(few_shot_qa, rt, question=questions[0][0]).text().startswith("Q: What is 3 + 4?")
    if TRAINED:
        right = sum(st["answer"].strip() == a for st, (_, a) in zip(states, questions))
        assert right >= 3, [st["answer"] for st in states]


def test_multi_turn_chat(rt):
    st = run_both(multi_turn, rt, q1="What is 2 + 2?", q2="Thank you!")
    msgs = st.messages()
    assert len(msgs) == 5
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == st["a1"] and msgs[4]["content"] == st["a2"]
    assert st.text() == rt.apply_chat_template(msgs)  # the model's own template, exactly
    if TRAINED:
        assert st["a1"].strip() == "4" and st["a2"] == "You are welcome."


def _fact_questions() -> list[tuple[str, str, str]]:
    """(facts, question, answer) with two questions of each answer, from seeded fact sets."""
    items, want, seed = [], {"True": 2, "False": 2, "Unknown": 2}, 0
    while any(want.values()):
        facts, pairs = tiny_tasks.make_qa_set(random.Random(seed), "facts", 4)
        seed += 1
        for q, a in pairs:
            if want.get(a, 0) > 0:
                want[a] -= 1
                items.append((facts, q, a))
                break
    return items


def test_select_true_false_unknown(rt):
    items = _fact_questions()
    states = fact_check.run_batch([{"facts": f, "question": q} for f, q, _ in items], backend=rt)
    assert all(st["answer"] in tiny_tasks.QA_ANSWER_CHOICES for st in states)
    meta = states[0].get_meta_info("answer")
    assert len(meta["logprobs"]) == 3 and meta["picked"] == tiny_tasks.QA_ANSWER_CHOICES.index(
        states[0]["answer"]
    )
    run_both(fact_check, rt, facts=items[0][0], question=items[0][1])
    if TRAINED:
        assert sum(st["answer"] == a for st, (_, _, a) in zip(states, items)) >= 5


def test_decode_int(rt):
    st = run_both(decode_int, rt, question="What is 4 + 4?")
    assert re.fullmatch(r"-?\d+", st["answer"])
    if TRAINED:
        assert int(st["answer"]) == 8


def test_decode_json_in_var_scope(rt):
    text, record = tiny_tasks.make_extraction_example(random.Random(3), "person")
    st = run_both(decode_json, rt, text=text)
    assert st.text().endswith(st["json_output"])
    assert (
        st["json_output"]
        == '{"name":"' + st["name"] + '","age":' + st["age"] + ',"city":"' + st["city"] + '"}'
    )
    finished = all(st.get_meta_info(k)["finish_reason"] == "stop" for k in ("name", "age", "city"))
    if not finished and not TRAINED:
        return  # a random model may run out of tokens inside a string; the JSON is then cut
    out = json.loads(st["json_output"])
    assert set(out) == {"name", "age", "city"} and isinstance(out["age"], int)
    if TRAINED:
        assert out["name"] == record["name"] and out["age"] == record["age"]


def test_expert_answer_reads_a_variable_mid_program(rt):
    st = run_both(expert_answer, rt, question="What is the capital of France?")
    assert "For instance," + st["expert"] + " would say: " in st.text()
    assert st.run_stats()["segments"] == 2  # the read of "expert" is a sync point


def test_tool_use_evaluates_generated_code(rt):
    st = run_both(tool_use, rt)
    a, b = (int(x) for x in st["expression"].split(" + "))
    assert st.text().endswith(f"\nResult: {a + b}")


def test_react_control_flow_follows_select(rt):
    st = run_both(react, rt, question="Where does Ada live?")
    actions = [st[f"action_{i}"] for i in range(3) if f"action_{i}" in st]
    assert actions and all(a in ("Search", "Finish") for a in actions)
    # the loop stopped at the first Finish, or ran out of steps
    assert "Finish" not in actions[:-1]
    assert len(actions) == 3 or actions[-1] == "Finish"


def test_parallel_decoding_fork_join_summary(rt):
    st = run_both(parallel_decoding, rt, topic="rivers")
    assert len(st["idea"]) == 5 and all(isinstance(x, str) for x in st["idea"])
    assert st.text().endswith("In short:" + st["summary"])
    assert st.run_stats()["segments"] == 1


def test_stream_text_iter(rt):
    st = multi_turn.run(q1="Hi", q2="What is your name?", backend=rt, stream=True)
    chunks = list(st.text_iter())
    assert "".join(chunks) == st.text() and len(chunks) >= 5
    st = multi_turn.run(q1="Hi", q2="What is your name?", backend=rt, stream=True)
    assert "".join(st.text_iter("a2")) == st["a2"]


def test_regex_ip_address(rt):
    st = run_both(ip_address, rt)
    assert re.fullmatch(IP_REGEX, st["ip"])


def test_dtype_gen(rt):
    st = run_both(typed_values, rt)
    parse = {
        "age": int,
        "price": float,
        "married": {"true": True, "false": False, "True": True, "False": False}.get,
    }
    for name, to_value in parse.items():
        if st.get_meta_info(name)["finish_reason"] != "stop" and not TRAINED:
            continue  # cut by max_tokens: a random model may write long numbers
        assert to_value(st[name]) is not None, (name, st[name])


def test_min_tokens(rt):
    st = run_both(min_tokens, rt)
    assert st.get_meta_info("text")["completion_tokens"] >= 6


@llmir.function
def good_then_bad_constraint(s):
    s += "Q: What is 2 + 2?\nA:" + llmir.gen("a", max_tokens=2)
    s += "\nQ: 3 + 3?\nA:" + llmir.gen("b", max_tokens=2, regex="[^\\s\\S]")  # matches nothing: refused when it runs


@pytest.mark.parametrize("passes", [None, ""])
def test_a_bad_constraint_fails_its_own_gen_and_keeps_the_earlier_one(rt, passes):
    """With the passes on, the two gens are one fused chain: the bad regex must still be
    reported as gen 'b''s, and gen 'a' must keep its output, as call by call does."""
    st = good_then_bad_constraint.run_batch([{}], backend=rt, passes=passes)[0]
    assert st.error() is not None and "'b'" in str(st.error()) and "'a'" not in str(st.error())
    plain = good_then_bad_constraint.run_batch([{}], backend=rt, passes="")[0]
    assert st.variables().get("a") == plain.variables().get("a") and st.variables().get("a")
