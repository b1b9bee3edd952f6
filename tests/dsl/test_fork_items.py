"""``forks[i] += x`` appends to one branch (SGLang allows it); replacing a branch is an error."""

from __future__ import annotations

import pytest

import llmir_lang as llmir


def test_append_to_one_branch_by_index(fake):
    @llmir.function
    def prog(s):
        s += "Base text for the branches:\n"
        forks = s.fork(2)
        forks[1] += "only in the second branch "
        forks += llmir.gen("x", max_tokens=2)
        forks.join(mode="concate_and_append")

    st = prog.run(backend=fake)
    assert "only in the second branch " in st.text()
    assert st.text().count("only in the second branch ") == 1


def test_replacing_a_branch_is_an_error(fake):
    @llmir.function
    def prog(s):
        s += "Base"
        forks = s.fork(2)
        forks[0] = forks[1]

    with pytest.raises(llmir.DSLError, match="cannot be replaced"):
        prog.run(backend=fake)
