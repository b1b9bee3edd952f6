"""A batch over records where some are bad: each bad record fails alone, with a typed error that
says what is wrong with it, and every other record succeeds."""

from __future__ import annotations

import pytest

import llmir_lang as llmir
from llmir_lang.dsl.errors import InvalidAppendError


@llmir.function
def extract(s, text):
    s += "Text: " + text + "\nName:" + llmir.gen("name", max_tokens=3, stop="\n")


def test_a_lone_surrogate_is_refused_where_it_is_appended(fake):
    texts = ["Ada Lovelace", "Bad \ud800 record", "Grace Hopper", "caf\u00e9 \U0001f600 ok"]
    states = extract.run_batch([{"text": t} for t in texts], backend=fake)
    assert [st.error() is None for st in states] == [True, False, True, True]
    err = states[1].error()
    assert isinstance(err, InvalidAppendError)
    assert "lone surrogate (U+D800) at position 10" in str(err)  # "Text: Bad " is 10 characters
    assert "test_batch_bad_records.py" in str(err)  # the line that appended it
    with pytest.raises(InvalidAppendError, match="lone surrogate"):
        extract.run(text="\udc80", backend=fake)
