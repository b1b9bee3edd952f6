"""``separate_reasoning``: SGLang's split of a reasoning model's output into its answer and its
reasoning. The parser rule by rule (and against SGLang's own parser when it is installed), the
model_type errors, programs on a scripted backend (text, messages, later prompts, passes on and
off, fork/join, run_batch, var_scope, streaming, SGLang's own interpreter for comparison), the IR
attribute (print / parse, verifier scopes, fuse-constants) and programs on the bundled model."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

import llmir_lang as llmir
from llmir_lang.errors import IRVerifyError
from llmir_lang.ir import ModuleBuilder, parse_ir, print_ir, verify
from llmir_lang.ir.reasoning import FORMATS, split_reasoning
from llmir_lang.ir.semantics import evaluate
from llmir_lang.optimizer import PassManager

try:
    from sglang.srt.reasoning_parser import ReasoningParser as SGLangParser
except Exception:  # the optional extra llmir_lang[sglang] (0.4.10 has the parser in srt/)
    SGLangParser = None


def _line(fn, needle: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if needle in text)


# --- the parser, rule by rule ----------------------------------------------------------------
FORCED = ["deepseek-r1", "kimi_k2", "minimax", "qwen3-thinking", "step3"]
OPENED = ["deepseek-v3", "glm45", "interns1", "nano_v3", "qwen3"]


@pytest.mark.parametrize("fmt", FORCED + OPENED)
def test_think_tags_split_reasoning_from_the_answer(fmt):
    assert split_reasoning(fmt, "<think>hm, 2 + 2</think>4") == ("hm, 2 + 2", "4")
    # whitespace: stripped around the whole text and around the answer; the reasoning keeps
    # what precedes the end tag
    assert split_reasoning(fmt, "<think>\n  hm \n</think>\n\n 4 \n") == ("hm \n", "4")
    assert split_reasoning(fmt, "<think></think>4") == ("", "4")  # empty reasoning
    assert split_reasoning(fmt, "<think>\n\n</think>\n\n4") == ("", "4")
    # unterminated: all of it is reasoning (cut short by max_tokens)
    assert split_reasoning(fmt, "<think> still thinking ") == ("still thinking", "")
    # a second end tag stays in the answer; every start tag goes
    assert split_reasoning(fmt, "<think>a</think>b</think>c") == ("a", "b</think>c")
    assert split_reasoning(fmt, "<think>a<think>b</think>c") == ("ab", "c")


@pytest.mark.parametrize("fmt", FORCED)
def test_forced_formats_begin_inside_the_reasoning(fmt):
    assert split_reasoning(fmt, "hm, 2 + 2</think>\n4") == ("hm, 2 + 2", "4")  # deepseek-r1: no <think>
    assert split_reasoning(fmt, " no end tag at all ") == ("no end tag at all", "")
    assert split_reasoning(fmt, "") == ("", "")


@pytest.mark.parametrize("fmt", OPENED)
def test_opened_formats_only_split_after_a_start_tag(fmt):
    assert split_reasoning(fmt, " plain answer \n") == ("", " plain answer \n")  # untouched
    assert split_reasoning(fmt, "hm</think>4") == ("", "hm</think>4")
    assert split_reasoning(fmt, "") == ("", "")
    # a start tag anywhere puts the whole text in the reasoning block, as SGLang's parser does
    assert split_reasoning(fmt, "Sure. <think>r</think> 4") == ("Sure. r", "4")


def test_kimi_uses_its_own_tags_and_minimax_append_think_prepends_one():
    assert split_reasoning("kimi", "\u25c1think\u25b7 r \u25c1/think\u25b7 a") == ("r ", "a")
    assert split_reasoning("kimi", "<think>r</think>a") == ("", "<think>r</think>a")
    assert split_reasoning("kimi", "r\u25c1/think\u25b7a") == ("", "r\u25c1/think\u25b7a")
    assert split_reasoning("minimax-append-think", "r</think> a") == ("", "<think>r</think> a")


PIECES = [
    "<think>",
    "</think>",
    "\u25c1think\u25b7",
    "\u25c1/think\u25b7",
    " ",
    "\n",
    "\t",
    "\u3000",
    "a",
    "b c",
]


@pytest.mark.skipif(SGLangParser is None, reason="SGLang's frontend (llmir_lang[sglang]) is not installed")
@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.sampled_from(PIECES), max_size=8).map("".join))
def test_every_format_of_the_installed_sglang_parser_splits_the_same(text):
    for fmt in SGLangParser.DetectorMap:
        assert split_reasoning(fmt, text) == tuple(SGLangParser(fmt).parse_non_stream(text)), (fmt, text)


def test_the_installed_sglang_parsers_are_all_supported():
    if SGLangParser is None:
        pytest.skip("SGLang's frontend is not installed")
    assert set(SGLangParser.DetectorMap) <= set(FORMATS)


# --- model_type and the expression: errors at the user's line ---------------------------------
def test_model_type_is_required_and_checked_at_the_line_that_uses_it():
    here = test_model_type_is_required_and_checked_at_the_line_that_uses_it
    with pytest.raises(llmir.SeparateReasoningError, match="needs model_type") as e:
        llmir.separate_reasoning(llmir.gen("a"))
    assert isinstance(e.value, ValueError)
    assert e.value.where.line == _line(here, "separate_reasoning(llmir.gen")
    with pytest.raises(llmir.SeparateReasoningError, match="unknown reasoning format 'r2d2'.*deepseek-r1, "):
        llmir.separate_reasoning(llmir.gen("a"), model_type="R2D2")
    with pytest.raises(llmir.SeparateReasoningError, match="must be a parser name"):
        llmir.separate_reasoning(llmir.gen("a"), model_type=3)
    with pytest.raises(llmir.UnsupportedReasoningFormatError, match="harmony.*supported: deepseek-r1") as e:
        llmir.separate_reasoning(llmir.gen("a"), model_type="gpt-oss")
    assert isinstance(e.value, llmir.FeatureNotSupportedError) and isinstance(e.value, ValueError)
    assert llmir.separate_reasoning(llmir.gen("a"), "DeepSeek-R1").model_type == "deepseek-r1"  # as SGLang


def test_the_expression_must_name_its_gens_and_not_nest():
    with pytest.raises(llmir.SeparateReasoningError, match="needs the expression"):
        llmir.separate_reasoning(model_type="qwen3")
    with pytest.raises(llmir.SeparateReasoningError, match="unnamed gen"):
        llmir.separate_reasoning("A: " + llmir.gen(max_tokens=3), model_type="qwen3")
    with pytest.raises(llmir.SeparateReasoningError, match="unnamed select"):
        llmir.separate_reasoning(llmir.assistant(llmir.select(choices=["a", "b"])), model_type="qwen3")
    inner = llmir.separate_reasoning(llmir.gen("a"), model_type="qwen3")
    with pytest.raises(llmir.SeparateReasoningError, match="inside another"):
        llmir.separate_reasoning(["x", inner], model_type="qwen3")
    # no gen at all: appended as it is, as in SGLang
    assert llmir.separate_reasoning("just text", model_type="qwen3").expr == "just text"


# --- programs on a scripted backend ------------------------------------------------------------
OUT = " <think> step one \n</think>\n\n yes "  # (the fake streams words after a space)


@pytest.fixture()
def scripted(fake, monkeypatch):
    """``fake`` whose gens named in ``SCRIPT`` output their script (a function of the prompt or a
    text); others generate as the fake does. Output depends on the prompt only, as greedy's."""
    import fake_backend

    original = fake_backend.fake_generate
    script = {
        "a": OUT,
        "t": lambda p: f"<think>r{p[-2]}</think>a{p[-2]}",  # fork branches: "0:", "1:"
        "q": lambda p: f"<think>{p.rstrip()[-1]}</think> {p.rstrip()[-1]}!",
    }
    script["q2"] = script["q"]

    def generate(prompt, step):
        out = script.get(step.name)
        if out is None:
            return original(prompt, step)
        return (out(prompt) if callable(out) else out), "stop"

    monkeypatch.setattr(fake_backend, "fake_generate", generate)
    return fake


@llmir.function
def two_turns(s):
    s += llmir.user("Q?")
    s += llmir.assistant(llmir.separate_reasoning(llmir.gen("a", max_tokens=8), model_type="deepseek-r1"))
    s += llmir.user("again")
    s += llmir.assistant(llmir.gen("b", max_tokens=3))


def test_the_answer_replaces_the_output_in_text_messages_and_later_prompts(scripted):
    st = two_turns.run(backend=scripted)
    assert st["a"] == "yes" and st["a_reasoning_content"] == "step one \n"
    user = "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert st.text().startswith(user + "yes<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n")
    assert st.messages()[1] == {"role": "assistant", "content": "yes"}
    # the second turn is prompted without the first one's reasoning (SGLang's multi-turn example)
    second = user + "yes<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    assert [r.prompt for r in scripted.gen_requests][1] == second
    assert scripted.apply_chat_template(st.messages()) == st.text()
    meta = st.get_meta_info("a")
    assert meta["finish_reason"] == "stop" and st.get_meta_info("a_reasoning_content") == meta
    assert st.variables() == {"a": "yes", "a_reasoning_content": "step one \n", "b": st["b"]}


@llmir.function
def shapes(s):
    s += "Q: " + llmir.separate_reasoning(llmir.gen("a", max_tokens=8), model_type="qwen3") + "\n"
    s += llmir.separate_reasoning(llmir.user("hi") + llmir.assistant("B: " + llmir.gen("q")), "qwen3")
    s += "PREFER:<think>r</think> no\n" + llmir.separate_reasoning(
        llmir.select("c", ["<think>r</think> no", "<think>s</think> yes"]), model_type="qwen3"
    )
    s += "\nPREFER:maybe " + llmir.separate_reasoning(llmir.select("d", ["maybe", "never"]), "deepseek-r1")
    with s.var_scope("v"):
        s += "[" + llmir.separate_reasoning(llmir.gen("q2", max_tokens=4), model_type="glm45") + "]"
    s += "\nafter: " + s["q_reasoning_content"] + "/" + s["c"] + llmir.gen("tail", max_tokens=3)


@pytest.mark.parametrize("passes", [None, ""])
def test_around_roles_concatenations_and_selects_each_gen_appends_its_answer(scripted, passes):
    st = shapes.run(backend=scripted, passes=passes)
    assert st["a"] == "yes" and st["q"] == ":!" and st["q_reasoning_content"] == ":"
    assert st["c"] == "no" and st["c_reasoning_content"] == "r"  # a select's choice, split
    assert st["d"] == "" and st["d_reasoning_content"] == "maybe"  # deepseek-r1: no end tag
    assert st["q2"] == "[!" and st["v"] == "[[!]"  # a var_scope holds the answer, as the text
    text = st.text()
    assert text.startswith("Q: yes\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nB: :!<|im_end|>\n")
    assert "PREFER:<think>r</think> no\nno\nPREFER:maybe [[!]\nafter: :/no" in text
    assert st.messages()[1] == {"role": "assistant", "content": "B: :!"}


def test_passes_on_and_off_give_the_same_values_and_fuse_up_to_a_splitting_gen(scripted):
    @llmir.function
    def chained(s):
        s += "Q: " + llmir.gen("x", max_tokens=2) + " then "
        s += llmir.separate_reasoning(llmir.gen("a", max_tokens=8), model_type="step3")
        s += " and " + llmir.gen("y", max_tokens=2) + "." + llmir.gen("z", max_tokens=2)

    runs = {}
    for passes in (None, ""):
        scripted.reset()
        st = chained.run(backend=scripted, passes=passes)
        runs[passes] = (st.text(), st.variables(), [r.prompt for r in scripted.gen_requests])
    assert runs[None][:2] == runs[""][:2]
    assert runs[None][1]["a"] == "yes" and "then yes and" in runs[None][0]
    assert len(runs[""][2]) == 4 and len(runs[None][2]) == 2  # x+a fused (a ends it); y+z fused
    ir = print_ir(PassManager("canonicalize,fuse-constants").run(chained.trace()))
    assert 'reasoning = "step3"}]}' in ir


def test_fork_join_gathers_answers_and_reasonings_as_lists(scripted):
    @llmir.function
    def forked(s):
        s += "Two thoughts:\n"
        forks = s.fork(2)
        forks += lambda i: f"{i}:" + llmir.separate_reasoning(llmir.gen("t", max_tokens=8), "deepseek-r1")
        forks.join()
        s += "Done." + llmir.gen("z", max_tokens=2)

    for passes in (None, ""):
        st = forked.run(backend=scripted, passes=passes)
        assert st["t"] == ["a0", "a1"] and st["t_reasoning_content"] == ["r0", "r1"]
        assert st.get_meta_info("t_reasoning_content")["branches"][1]["finish_reason"] == "stop"

    @llmir.function
    def concat(s):
        forks = s.fork(2)
        forks += lambda i: f"{i}:" + llmir.separate_reasoning(llmir.gen("t", max_tokens=8), "deepseek-r1")
        forks.join("concate_and_append")

    assert concat.run(backend=scripted).text() == "0:a01:a1"


def test_run_batch_and_python_control_flow_on_the_split_values(scripted):
    @llmir.function
    def ask(s, n):
        s += "N=" + n
        s += llmir.separate_reasoning(llmir.gen("q", max_tokens=8), model_type="qwen3")
        if s["q_reasoning_content"] == n:  # a sync point on the reasoning variable
            s += " ok"
        s += " " + s["q"]

    states = ask.run_batch([{"n": str(i)} for i in range(4)], backend=scripted)
    assert [st.text() for st in states] == [f"N={i}{i}! ok {i}!" for i in range(4)]
    assert [st["q_reasoning_content"] for st in states] == ["0", "1", "2", "3"]


def test_names_are_claimed_and_traced_reads_verify(scripted):
    @llmir.function
    def clash(s):
        s += llmir.separate_reasoning(llmir.gen("a", max_tokens=8), model_type="qwen3")
        s += llmir.gen("a_reasoning_content", max_tokens=2)

    with pytest.raises(llmir.VariableRedefinedError, match="'a_reasoning_content' is already defined"):
        clash.run(backend=scripted)

    @llmir.function
    def clash_first(s):
        s += llmir.gen("a_reasoning_content", max_tokens=2)
        s += llmir.separate_reasoning(llmir.gen("a", max_tokens=8), model_type="qwen3")

    with pytest.raises(llmir.VariableRedefinedError):
        clash_first.run(backend=scripted)

    @llmir.function
    def reads(s):
        s += "Why?" + llmir.separate_reasoning(llmir.gen("a", max_tokens=8), model_type="deepseek-r1")
        s += " Because: " + s["a_reasoning_content"]

    module = reads.trace(backend=scripted)
    assert 'gen %1 "a" {max_tokens = 8, reasoning = "deepseek-r1"}' in print_ir(module)
    assert '= var %2 "a_reasoning_content"' in print_ir(module)
    assert reads.run(backend=scripted).text() == "Why?yes Because: step one \n"


def test_a_failed_gen_fails_its_reasoning_variable_too(scripted):
    @llmir.function
    def failing(s):
        s += llmir.separate_reasoning(llmir.gen("a"), model_type="qwen3")  # an empty prompt: it fails

    st = failing.run_batch([{}], backend=scripted)[0]
    assert isinstance(st.error(), llmir.GenerationError)
    with pytest.raises(llmir.GenerationError):
        st["a_reasoning_content"]


def test_a_streamed_run_does_not_split_as_in_sglang(scripted):
    st = two_turns.run(backend=scripted, stream=True)
    chunks = "".join(st.text_iter())
    assert chunks == st.text() and OUT in st.text() and st["a"] == OUT
    assert "a_reasoning_content" not in st
    with pytest.raises(llmir.UnknownVariableError, match="streamed run.*run without stream=True"):
        st["a_reasoning_content"]


# --- SGLang's own interpreter, on the same outputs ------------------------------------------------
def _sglang():
    try:
        import sglang as sgl
        from sglang.lang.backend.base_backend import BaseBackend
        from sglang.lang.chat_template import get_chat_template
    except Exception:
        pytest.skip("SGLang's frontend (llmir_lang[sglang]) is not installed")

    class Scripted(BaseBackend):
        def __init__(self):
            super().__init__()
            self.chat_template = get_chat_template("chatml")

        def get_chat_template(self):
            return self.chat_template

        def generate(self, s, sampling_params):
            return OUT, {}

    return sgl, Scripted()


def test_from_sglang_matches_sglang_where_its_text_is_well_formed(scripted):
    sgl, backend = _sglang()

    @sgl.function
    def sgl_two_turns(s):
        s += sgl.user("Q?")
        s += sgl.assistant(sgl.separate_reasoning(sgl.gen("a", max_tokens=8), model_type="deepseek-r1"))
        s += sgl.user("again")
        s += sgl.assistant(sgl.gen("a2", max_tokens=8))

    want = sgl_two_turns.run(backend=backend)
    got = llmir.from_sglang(sgl_two_turns).run(backend=scripted)
    assert got["a"] == want["a"] == "yes" and got["a_reasoning_content"] == want["a_reasoning_content"]
    head = want.text()[: want.text().index("again")]
    assert got.text().startswith(head) and got.messages()[:3] == want.messages()[:3]

    @sgl.function
    def sgl_around_role(s):
        s += sgl.user("Q?")
        s += sgl.separate_reasoning(sgl.assistant(sgl.gen("a", max_tokens=8)), model_type="qwen3")

    got = llmir.from_sglang(sgl_around_role).run(backend=scripted)
    want = sgl_around_role.run(backend=backend)
    assert (got["a"], got["a_reasoning_content"]) == (want["a"], want["a_reasoning_content"])
    # SGLang drops the role's end marker here (and keeps the output in messages); llmir does not
    assert want.text().endswith("assistant\nyes") and got.text().endswith("assistant\nyes<|im_end|>\n")

    @sgl.function
    def sgl_unknown(s):
        s += sgl.separate_reasoning(sgl.gen("a"), model_type="no-such-parser")

    with pytest.raises(llmir.SeparateReasoningError, match="unknown reasoning format") as e:
        llmir.from_sglang(sgl_unknown).run(backend=scripted)
    assert e.value.where.line == _line(sgl_unknown.func, "no-such-parser")


def test_from_sglang_takes_separate_reasoning_inside_a_concatenation(scripted):
    # SGLang's "+" flattens separate_reasoning's [expr, SglSeparateReasoning] into its neighbours
    sgl, backend = _sglang()

    @sgl.function
    def sgl_concatenated(s):
        s += sgl.user("Q?")
        s += sgl.assistant("A: " + sgl.separate_reasoning(sgl.gen("a", max_tokens=8), "deepseek-r1") + "!")

    want = sgl_concatenated.run(backend=backend)
    got = llmir.from_sglang(sgl_concatenated).run(backend=scripted)
    assert (got["a"], got["a_reasoning_content"]) == (want["a"], want["a_reasoning_content"])
    assert got["a"] == "yes" and got.text().endswith("assistant\nA: yes!<|im_end|>\n")

    @sgl.function
    def sgl_two(s):  # (the scripted SGLang backend does not score: llmir only)
        pick = sgl.select("c", choices=["<think>x</think>y", "z"])
        s += "PREFER:z " + sgl.separate_reasoning(pick, "qwen3")
        q, q2 = sgl.gen("q", max_tokens=8), sgl.gen("q2", max_tokens=8)
        s += sgl.separate_reasoning(q, "qwen3") + sgl.separate_reasoning(q2, "qwen3")

    got = llmir.from_sglang(sgl_two).run(backend=scripted)
    assert got.text() == "PREFER:z zz!!!" and got.variables() == {
        "c": "z", "c_reasoning_content": "", "q": "z!", "q_reasoning_content": "z", "q2": "!!", "q2_reasoning_content": "!",
    }  # fmt: skip


# --- the IR ---------------------------------------------------------------------------------------
IR = """module {
  func @f() {
    %0 = start
    %1 = gen %0 "a" {max_tokens = 8, reasoning = "deepseek-r1"}
    %2 = var %1 "a_reasoning_content"
    %3 = append %1, %2
    %4 = select %3 "c" {choices = ["x", "y"], reasoning = "kimi"}
    %5 = gen.chain %4 {segments = [{gen = "b"}, {text = "."}, {gen = "d", reasoning = "qwen3"}]}
    %6 = var %5 "d_reasoning_content"
    return %5
  }
}
"""


def test_the_attribute_prints_and_parses_back_and_defines_the_reasoning_variable():
    module = parse_ir(IR)
    assert print_ir(module) == IR and parse_ir(print_ir(module)) == module
    assert module.functions[0].ops[1].defined_names() == ("a", "a_reasoning_content")
    assert module.functions[0].ops[5].defined_names() == ("b", "d", "d_reasoning_content")
    mb = ModuleBuilder()
    f = mb.function("g")
    s = f.gen(f.start(), "a", reasoning="qwen3")
    s = f.select(s, "c", ["x"], reasoning="qwen3")
    f.var(s, "c_reasoning_content")
    f.ret(s)
    verify(mb.build())
    with pytest.raises(IRVerifyError, match="unknown reasoning format 'gpt'"):
        f2 = ModuleBuilder().function("h")
        f2.gen(f2.start(), "a", reasoning="gpt")


@pytest.mark.parametrize(
    "change,message",
    [
        (('%2 = var %1 "a_reasoning_content"', '%2 = var %0 "a_reasoning_content"'), "not defined"),
        (('reasoning = "kimi"', 'reasoning = "gpt-oss"'), "'gpt-oss' is not supported"),
        (('"c" {choices', '"a_reasoning_content" {choices'), "defined"),
        (('{gen = "b"}', '{gen = "b", reasoning = "qwen3"}'), "not the chain's last gen"),
    ],
)
def test_the_verifier_checks_formats_scopes_and_chains(change, message):
    with pytest.raises(IRVerifyError, match=message):
        parse_ir(IR.replace(*change))


def test_reference_semantics_and_fuse_constants_agree():
    class Model:
        def generate(self, prompt, name, params):
            return f"<think>{name}</think> {len(prompt)}"

        def select(self, prompt, name, choices, method):
            return choices[0]

    module = parse_ir(IR)
    fused = PassManager("fuse-constants").run(module)
    want = evaluate(module, Model())["f"].returned[0]
    assert evaluate(fused, Model())["f"].returned[0] == want
    assert want.variables["a"] == "0" and want.variables["a_reasoning_content"] == "a"
    assert want.text == "0ax<think>b</think> 3.22"
    assert want.variables["d_reasoning_content"] == "d"


# --- the bundled model ----------------------------------------------------------------------------
THINK = r"<think>[a-z ]{1,8}</think> ?[a-z]{1,5}"


def _program(split: bool):
    def wrap(x, fmt):
        return llmir.separate_reasoning(x, model_type=fmt) if split else x

    @llmir.function
    def reason(s, q):
        s += "Q: " + q + "\nA: " + wrap(llmir.gen("a", max_tokens=64, regex=THINK), "deepseek-r1")
        s += "\nB: " + wrap(llmir.gen("b", max_tokens=8, regex="[a-z]{1,5}"), "qwen3") + "\nC:"
        forks = s.fork(2)
        forks += lambda i: f" {i}" + wrap(llmir.gen("t", max_tokens=64, regex=THINK), "deepseek-r1")
        forks.join()
        s += llmir.gen("c", max_tokens=3, stop="\n")

    return reason


@pytest.mark.parametrize("passes", [None, ""])
def test_on_the_engine_values_are_the_split_of_what_the_model_generated(rt, passes):
    def generated(meta):  # the gen's output, as the model generated it
        return rt.get_tokenizer().decode(meta["token_ids"])

    st = _program(True).run(q="hi", backend=rt, passes=passes)
    raw = generated(st.get_meta_info("a"))
    assert raw.startswith("<think>") and "</think>" in raw
    assert (st["a_reasoning_content"], st["a"]) == split_reasoning("deepseek-r1", raw)
    assert _program(False).run(q="hi", backend=rt, passes=passes)["a"] == raw  # the same generation
    assert (st["b_reasoning_content"], st["b"]) == ("", generated(st.get_meta_info("b")))
    branches = st.get_meta_info("t")["branches"]
    assert [split_reasoning("deepseek-r1", generated(m)) for m in branches] == list(
        zip(st["t_reasoning_content"], st["t"])
    )
    assert st.text().startswith(f"Q: hi\nA: {st['a']}\nB: {st['b']}\nC:")
    on = _program(True).run(q="hi", backend=rt)
    assert (on.text(), on.variables()) == (st.text(), st.variables())


def test_on_the_engine_run_batch_equals_runs_one_by_one(rt):
    program = _program(True)
    batch = program.run_batch([{"q": q} for q in ("hi", "why", "how")], backend=rt)
    for q, st in zip(("hi", "why", "how"), batch):
        alone = program.run(q=q, backend=rt)
        assert (st.text(), st.variables()) == (alone.text(), alone.variables())
