"""``unfinished_value``'s cause where a server gated a reasoning model's constraint otherwise than
the gen says (what a remote backend cannot always tell beforehand): a gen inside
``separate_reasoning`` whose output has no end tag (the server constrained the whole output), and
a gen over its whole output whose output holds an end tag its constraint does not spell (the
server constrained only the answer). Other failures keep their causes."""

from __future__ import annotations

from llmir_lang.dsl.lowering import unfinished_value

R1 = {"regex": r"\d+", "reasoning": "deepseek-r1"}
LEAK = "the constraint engine let through output its constraint rejects"


def test_a_gated_gen_without_an_end_tag_names_a_server_that_does_not_gate():
    why = unfinished_value("x", R1, "17")  # the model was made to answer at once
    assert why is not None and "'' is not a complete match" in why
    assert "holds no end tag '</think>'" in why and "--reasoning-parser deepseek-r1" in why
    assert "move the constrained gen out of separate_reasoning" in why and LEAK not in why
    choices = unfinished_value("x", {"choices": ("yes", "no"), "reasoning": "qwen3"}, "<think>hm")
    assert choices is not None and "holds no end tag '</think>'" in choices
    # with the end tag, the answer itself is wrong: the cause is what it was
    assert LEAK in unfinished_value("x", R1, "hm</think> seven")
    assert unfinished_value("x", R1, "hm</think> 17") is None
    # a stop that cut it keeps its own cause
    stopped = unfinished_value("x", {**R1, "stop": "1"}, "hm</think> ", "1")
    assert "a stop string" in stopped and "end tag" not in stopped


def test_an_ungated_gen_with_an_end_tag_names_a_server_that_gates():
    why = unfinished_value("x", {"regex": r"\d+"}, "hm</think>17")
    assert "holds the reasoning end tag '</think>'" in why and "separate_reasoning(" in why
    assert LEAK not in why
    # a constraint that spells the tag: the tag is no sign of a server's gate
    spelled = {"regex": r"<think>[a-z]+</think>\d+", "reasoning": "deepseek-r1"}
    assert LEAK in unfinished_value("x", spelled, "<think>hm</think>x")
    assert LEAK in unfinished_value("x", {"regex": r"\d+"}, "seven")
