"""Jupyter support: ``ProgramState._repr_html_``, ``display_stream``, ``%%llmir``, and the example
notebook executed end to end with nbclient (on the bundled model)."""

from __future__ import annotations

import html
import io
import re
import time
from pathlib import Path

import pytest
import torch

import llmir_lang as llmir
from llmir_lang.dsl import notebook
from llmir_lang.dsl.notebook import CellMagicError, parse_magic_line, render_state_html, state_summary
from llmir_lang.dsl.testing import bundled_model_available

torch.set_num_threads(1)
TRAINED = bundled_model_available()
NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"


@llmir.function
def chat(s, question):
    s += llmir.system("You are a helpful assistant.")
    s += llmir.user(question)
    s += llmir.assistant(llmir.gen("reply", max_tokens=8))


@llmir.function
def verdict(s):
    s += "Facts: Ada lives in Paris.\nQ: Does Ada live in Paris?\nA: "
    s += llmir.select("verdict", ["True", "False", "Unknown"])
    s += "\n" + llmir.gen(max_tokens=2)


@llmir.function
def user_turn(s, question):
    s += llmir.user(question)
    s += llmir.assistant(llmir.gen("answer", max_tokens=6))


def _title_of(page: str, css: str) -> list[str]:
    return re.findall(rf'<span class="{css}" title="([^"]*)">', page)


def test_html_role_blocks_escaped_text_and_variables(rt):
    question = 'What is <b>2 + 2</b> & "why"?'
    state = chat.run(question=question, backend=rt)
    page = state._repr_html_()
    assert page == render_state_html(state)
    # role blocks in order, each labelled
    roles = re.findall(r'<div class="llmir-role llmir-role-(\w+)">', page)
    assert roles == ["system", "user", "assistant"]
    # every text is escaped: the user's markup appears as text, never as markup
    assert "<b>" not in page and "&lt;b&gt;2 + 2&lt;/b&gt; &amp; &quot;why&quot;?" in page
    assert "&lt;|im_start|&gt;" in page  # template markers shown (dimmed), escaped
    # the generated variable is a highlighted span whose tooltip names it and gives its counts
    meta = state.get_meta_info("reply")
    (title,) = _title_of(page, "llmir-gen")
    assert "gen &#x27;reply&#x27;" in title
    assert f"completion tokens: {meta['completion_tokens']}" in title
    assert f"prompt tokens: {meta['prompt_tokens']}" in title
    assert f"cached tokens: {meta['cached_tokens']}" in title
    assert html.escape(state["reply"]) in page
    assert '<sup class="llmir-var">reply</sup>' in page
    assert "<script" not in page  # self-contained, no JS
    summary = state_summary(state)
    assert summary["gens"] == 1 and summary["completion_tokens"] == meta["completion_tokens"]
    assert f"{meta['completion_tokens']} completion tokens" in page and "finished" in page


def test_html_shows_cache_hits_and_select_scores(rt):
    chat.run(question="What is 1 + 1?", backend=rt)
    state = chat.run(question="What is 1 + 1?", backend=rt)  # same prompt: the prefix is cached
    cached = state.get_meta_info("reply")["cached_tokens"]
    assert cached > 0
    assert f"cached tokens: {cached}" in _title_of(state._repr_html_(), "llmir-gen")[0]
    assert f"({cached} cached)" in state._repr_html_()

    sel = verdict.run(backend=rt)
    page = sel._repr_html_()
    (title,) = _title_of(page, "llmir-select")
    meta = sel.get_meta_info("verdict")
    best = meta["choices"][meta["picked"]]
    assert best == sel["verdict"]
    assert "select &#x27;verdict&#x27;" in title and "&#x27;Unknown&#x27;:" in title
    # the anonymous gen is highlighted but carries no variable label
    assert len(_title_of(page, "llmir-gen")) == 1
    assert page.count('<sup class="llmir-var">') == 1
    assert state_summary(sel)["selects"] == 1


def test_html_of_a_failed_program_and_of_a_running_one(fake):
    @llmir.function
    def broken(s):
        s += "x" + llmir.gen("a", max_tokens=2)
        s += s["missing"]

    (state,) = broken.run_batch([{}], backend=fake)
    assert state.error() is not None
    assert "error: " in state._repr_html_()

    fake.delay = 0.5  # the first gen is still running when the page is rendered
    running = chat.run(question="hi", backend=fake, stream=True)
    deadline = time.monotonic() + 0.4  # the body runs on a pooled thread: until it has recorded
    page = running._repr_html_()  # its first gen the page shows no piece yet
    while 'class="llmir-pending"' not in page and time.monotonic() < deadline:
        time.sleep(0.01)
        page = running._repr_html_()
    assert "running" in page and 'class="llmir-pending"' in page
    running.sync()
    page = running._repr_html_()
    assert "finished" in page and 'class="llmir-pending"' not in page


def test_display_stream_without_ipython_prints_chunks(rt):
    sink = io.StringIO()
    state = chat.run(question="What is 3 + 4?", backend=rt, stream=True)
    assert notebook.display_stream(state, file=sink) is state
    assert sink.getvalue() == state.text() + "\n"
    sink = io.StringIO()
    state = chat.run(question="What is 3 + 4?", backend=rt, stream=True)
    notebook.display_stream(state, "reply", file=sink)
    assert sink.getvalue() == state["reply"] + "\n"


def test_display_stream_updates_one_display_in_ipython(rt, monkeypatch):
    updates: list[str] = []

    class Handle:
        def update(self, obj: str) -> None:
            updates.append(obj)

    def display(obj: str, display_id: bool = False) -> Handle:
        assert display_id is True
        updates.append(obj)
        return Handle()

    monkeypatch.setattr(notebook, "_ipython_display", lambda: (display, str))
    state = chat.run(question="What is 5 + 3?", backend=rt, stream=True)
    notebook.display_stream(state, interval=0.0)
    assert len(updates) >= 2
    assert updates[-1] == render_state_html(state)
    assert "finished" in updates[-1]


def test_magic_line_parsing():
    ns = parse_magic_line("--chat --system 'Be brief.' --max-tokens 5 --stop '\\n' --var a --out st")
    assert (ns.chat, ns.system, ns.max_tokens, ns.stop, ns.var, ns.out) == (
        True,
        "Be brief.",
        5,
        ["\\n"],
        "a",
        "st",
    )
    for bad in ("--max-tokens x", "--max-tokens 0", "--var 'a b'", "--nope", "--system 'unclosed"):
        with pytest.raises(CellMagicError, match="%%llmir"):
            parse_magic_line(bad)


def test_cell_magic_in_an_ipython_shell(rt):
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "llmir_lang.dsl.notebook")
    previous = llmir.get_default_backend()
    llmir.set_default_backend(rt)
    try:
        shell.run_cell_magic("llmir", "--chat --no-stream --max-tokens 6 --out st", "What is 2 + 2?\n")
        st = shell.user_ns["st"]
        assert [m["role"] for m in st.messages()][-2:] == ["user", "assistant"]
        assert st.messages()[-2]["content"] == "What is 2 + 2?"
        expected = user_turn.run(question="What is 2 + 2?", backend=rt)
        assert st.text() == expected.text()  # the same program written in the DSL
        shell.run_cell_magic("llmir", "--no-stream --max-tokens 3 --stop '\\n'", "Q: What is 3 + 4?\nA:")
        plain = shell.user_ns["_llmir"]
        assert plain.text().startswith("Q: What is 3 + 4?\nA:") and "\n" not in plain["answer"]
        with pytest.raises(CellMagicError, match="empty"):
            notebook.run_cell_prompt("", "   \n", backend=rt)
    finally:
        llmir.set_default_backend(previous)


@pytest.mark.skipif(not TRAINED, reason="the example notebook runs on the bundled llmir-tiny model")
def test_example_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    try:
        client.create_kernel_manager()
        client.start_new_kernel()
        client.start_new_kernel_client()
    except Exception as e:  # only the kernel's start is allowed to skip the test
        pytest.skip(f"the Jupyter kernel (ipykernel 'python3') could not start here: {type(e).__name__}: {e}")
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    htmls = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any('class="llmir-state"' in h and "llmir-role-assistant" in h for h in htmls)
