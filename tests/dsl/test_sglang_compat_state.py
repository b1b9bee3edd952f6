"""SGLang frontend programs that use the state and fork objects run unchanged (fake backend):
role methods with an argument, ``forks += tuple``, SGLang's keyword names, ``with s.copy()``,
``fork()``'s defaults, ``str(state)``, setting a generated variable after the run, join modes,
and ``messages()``."""

from __future__ import annotations

import asyncio
import inspect
import os

import pytest

import llmir_lang as llmir
from llmir_lang.dsl.errors import (
    DSLError,
    ForkError,
    InvalidJoinModeError,
    VariableRedefinedError,
)
from llmir_lang.errors import NotYetSupportedError

HERE = os.path.basename(__file__)


def _line_of(fn, needle: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if needle in line)


def _check(err: DSLError, program: str, line: int, *words: str) -> None:
    text = str(err)
    assert f"program {program!r}" in text and f"{HERE}:{line}" in text, text
    for w in words:
        assert w in text, text


# --- 1. s.system(expr) / s.user(expr) / s.assistant(expr) -------------------------------------
def test_role_methods_with_an_argument_append_a_whole_message(fake):
    @llmir.function
    def methods(s, q):
        assert s.system("Be brief.") is None
        s.user(q)
        s.assistant(llmir.gen("a", max_tokens=3))
        with s.user():  # no argument: still the block form
            s += "More"
        s.assistant("Done.")

    @llmir.function
    def appended(s, q):
        s += llmir.system("Be brief.")
        s += llmir.user(q)
        s += llmir.assistant(llmir.gen("a", max_tokens=3))
        s += llmir.user("More")
        s += llmir.assistant("Done.")

    got, want = methods.run(q="Hi", backend=fake), appended.run(q="Hi", backend=fake)
    assert got.text() == want.text() and got["a"] == want["a"]
    assert [m["role"] for m in got.messages()] == ["system", "user", "assistant", "user", "assistant"]


def test_role_method_on_a_finished_state_is_refused(fake):
    @llmir.function
    def f(s):
        s += "x"

    st = f.run(backend=fake)
    with pytest.raises(DSLError, match="finished"):
        st.user("late")


# --- 2. forks += tuple -----------------------------------------------------------------------
def test_fork_tuple_gives_one_value_per_branch(fake):
    @llmir.function
    def f(s):
        s += "x"
        forks = s.fork(2)
        forks += ("a", "b")
        forks.join(mode="concate_and_append")

    assert f.run(backend=fake).text() == "xab"


def test_fork_tuple_of_wrong_length(fake):
    def prog(s):
        s += "text"
        forks = s.fork(3)
        forks += ("a", "b")

    with pytest.raises(ForkError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, '("a", "b")'), "2 values", "3 branches")


# --- 3. text_iter(var_name=...), text_async_iter(var_name=..., return_meta_data=...) ----------
@llmir.function
def streamy(s):
    s += "Q: hi\nA:" + llmir.gen("ans", max_tokens=4, ignore_eos=True) + "\nQ: bye\nA:"
    s += llmir.gen("other", max_tokens=2, ignore_eos=True)


@pytest.mark.parametrize("stream", [True, False])
def test_text_iter_takes_sglangs_var_name(fake, stream):
    st = streamy.run(backend=fake, stream=stream)
    assert "".join(st.text_iter(var_name="ans")) == st["ans"]
    assert "".join(streamy.run(backend=fake, stream=stream).text_iter(var="ans")) == st["ans"]
    assert "".join(streamy.run(backend=fake, stream=stream).text_iter("ans")) == st["ans"]
    with pytest.raises(TypeError, match="var_name='ans' and var='other'"):
        st.text_iter(var_name="ans", var="other")


@pytest.mark.parametrize("stream", [True, False])
def test_text_async_iter_takes_sglangs_keywords(fake, stream):
    async def main() -> tuple[str, str]:
        st = await streamy.arun(backend=fake, stream=stream)
        parts = [c async for c in st.text_async_iter(var_name="ans", return_meta_data=False)]
        return "".join(parts), st["ans"]

    streamed, final = asyncio.run(main())
    assert streamed == final


def test_text_async_iter_refuses_meta_data_at_the_call(fake):
    st = streamy.run(backend=fake, stream=True)
    with pytest.raises(llmir.FeatureNotSupportedError) as e:
        st.text_async_iter(var_name="ans", return_meta_data=True)  # before any iteration
    assert isinstance(e.value, NotYetSupportedError) and isinstance(e.value, NotImplementedError)
    assert "get_meta_info" in str(e.value)
    st.sync()


# --- 4. with s.copy() as c -------------------------------------------------------------------
def test_copy_as_a_context_manager_joins_back_like_sglang(fake):
    @llmir.function
    def f(s):
        s += "Hello"
        with s.copy() as c:
            c += " there" + llmir.gen("x", max_tokens=2, ignore_eos=True)
        s += "!" + llmir.gen("y", max_tokens=2, ignore_eos=True)

    st = f.run(backend=fake)
    x = st["x"]
    assert isinstance(x, list) and len(x) == 1 and x[0]  # gather join: a list of one
    assert st.text() == "Hello!" + st["y"]  # the copy's text stays in the copy
    assert st.run_stats()["segments"] == 1  # fork(1) + join: no sync point


def test_copy_joins_after_a_sync_point_and_when_the_parent_moved_on(fake):
    @llmir.function
    def f(s):
        s += "Start"
        with s.copy() as c:
            c += ":" + llmir.gen("x", max_tokens=2, ignore_eos=True)
            s["seen"] = c["x"]  # a sync point inside the block
            s += " parent"
        s += "." + llmir.gen("y", max_tokens=1, ignore_eos=True)

    st = f.run(backend=fake)
    assert st["x"] == [st["seen"]]
    assert st.text() == "Start parent." + st["y"]


def test_copy_kept_as_a_value_is_never_joined(fake):
    @llmir.function
    def f(s):
        s += "Base"
        c = s.copy()
        c += llmir.gen("x", max_tokens=2, ignore_eos=True)
        s["copy_x"] = c["x"]

    st = f.run(backend=fake)
    assert "x" not in st and st["copy_x"]


def test_copy_block_left_by_an_exception_still_joins(fake):
    @llmir.function
    def f(s):
        s += "Base"
        try:
            with s.copy() as c:
                c += llmir.gen("x", max_tokens=2, ignore_eos=True)
                raise ValueError("caught below")
        except ValueError:
            pass
        s += llmir.gen("y", max_tokens=1)

    st = f.run(backend=fake)
    assert len(st["x"]) == 1


def test_copy_enters_once(fake):
    def prog(s):
        s += "Base"
        c = s.copy()
        with c:
            c += "a"
        with c:  # again
            c += "b"

    with pytest.raises(ForkError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, "# again"), "s.copy() again")


# --- 5. fork() defaults and position_ids_offset ----------------------------------------------
def test_fork_without_size_is_one_branch_and_takes_position_ids_offset_none(fake):
    @llmir.function
    def f(s):
        s += "Hi"
        one = s.fork()
        one[0] += llmir.gen("x", max_tokens=2, ignore_eos=True)
        one.join()
        two = s.fork(2, position_ids_offset=None)
        two += llmir.gen("y", max_tokens=2, ignore_eos=True)
        two.join()
        three = s.fork(size=3)
        three.join()
        assert len(one) == 1 and len(two) == 2 and len(three) == 3

    st = f.run(backend=fake)
    assert len(st["x"]) == 1 and len(st["y"]) == 2


@pytest.mark.parametrize("call", ["fork", "copy"])
def test_position_ids_offset_is_refused(fake, call):
    def prog(s):
        s += "Hi"
        getattr(s, call)(position_ids_offset=[0, 1])

    with pytest.raises(llmir.FeatureNotSupportedError) as e:
        llmir.function(prog).run(backend=fake)
    assert isinstance(e.value, NotImplementedError)
    _check(e.value, "prog", _line_of(prog, "position_ids_offset"), f"{call}(position_ids_offset=...)")


# --- 6. str(state) ---------------------------------------------------------------------------
def test_str_is_sglangs_full_text_and_repr_stays_short(fake):
    @llmir.function
    def f(s):
        s += "A" * 100 + ":" + llmir.gen("x", max_tokens=2)

    st = f.run(backend=fake)
    assert str(st) == f"ProgramState({st.text()})"
    assert repr(st) == f"ProgramState({st.text()[-60:]!r})"


# --- 7. state[name] = value after the run; a reused name while it runs -----------------------
def test_generated_variable_can_be_replaced_once_the_program_finished(fake):
    @llmir.function
    def f(s):
        s += "Q: year?\nA:" + llmir.gen("int_res", max_tokens=2, ignore_eos=True)
        with s.var_scope("scope"):
            s += "x"
        forks = s.fork(2)
        forks += llmir.gen("joined", max_tokens=1)
        forks.join()

    st = f.run(backend=fake)
    meta = st.get_meta_info("int_res")
    st["int_res"] = 1987  # SGLang's test_dtype_gen: state["int_res"] = int(state["int_res"])
    assert st["int_res"] == 1987 and st.get_meta_info("int_res") == meta
    st["int_res"] = 1988  # again: the gen's meta stays
    assert st["int_res"] == 1988 and st.get_meta_info("int_res") == meta
    st["scope"], st["joined"] = "s", "j"
    assert (st["scope"], st["joined"]) == ("s", "j")


def test_setting_a_generated_variable_while_the_program_runs_says_what_to_do(fake):
    def prog(s):
        s += "x" + llmir.gen("a", max_tokens=2)
        s["a"] = "over"

    with pytest.raises(VariableRedefinedError) as e:
        llmir.function(prog).run(backend=fake)
    _check(e.value, "prog", _line_of(prog, '"over"'), "'a'", "SGLang", "'a_value'", "finished")


def test_reused_gen_name_says_sglang_overwrites_and_what_to_do(fake):
    def chat_loop(s):
        for t in ["a", "b"]:
            s += llmir.user(t)
            s += llmir.assistant(llmir.gen("answer", max_tokens=2))

    with pytest.raises(VariableRedefinedError) as e:
        llmir.function(chat_loop).run(backend=fake)
    _check(e.value, "chat_loop", _line_of(chat_loop, 'gen("answer"'), "already defined", "SGLang")
    assert "f'answer_{i}'" in str(e.value) and "var_scope" in str(e.value)


def test_the_suggested_var_scope_per_turn_works(fake):
    @llmir.function
    def chat_loop(s):
        for i, t in enumerate(["a", "b"]):
            s += llmir.user(t)
            with s.assistant(), s.var_scope(f"answer_{i}"):
                s += llmir.gen(max_tokens=2, ignore_eos=True)

    st = chat_loop.run(backend=fake)
    msgs = st.messages()
    assert [msgs[1]["content"], msgs[3]["content"]] == [st["answer_0"], st["answer_1"]]


# --- 8. join mode, messages() ----------------------------------------------------------------
def test_unknown_join_mode_is_also_a_value_error(fake):
    def prog(s):
        s += "x"
        forks = s.fork(2)
        forks.join(mode="bogus")

    with pytest.raises(ValueError) as e:
        llmir.function(prog).run(backend=fake)
    assert isinstance(e.value, InvalidJoinModeError) and isinstance(e.value, ForkError)
    _check(e.value, "prog", _line_of(prog, "bogus"), "'bogus'", "concate_and_append")


def test_messages_leave_out_an_open_role_and_keep_leading_spaces(fake):
    @llmir.function
    def f(s):
        s += llmir.user("hi")
        s += llmir.assistant("   hello")
        s += llmir.user_begin() + "never closed"

    st = f.run(backend=fake)
    assert st.messages() == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "   hello"}]
    closed = st.text()[: st.text().index("<|im_start|>user\nnever")]
    assert closed == fake.apply_chat_template(st.messages())
