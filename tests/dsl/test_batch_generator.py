"""``run_batch(..., generator_style=True)`` over long batches: a consumer that stops early stops
the batch, and a consumer that drops the states it has read keeps memory flat."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
from fake_backend import FakeBackend

import llmir_lang as llmir

N = 40


@pytest.fixture()
def slow():
    backend = FakeBackend(delay=0.02, workers=4)
    yield backend
    backend.pool.shutdown(wait=True)


def _counting_program(ended: list[int]):
    @llmir.function
    def item(s, i):
        s += f"Item {i}:" + llmir.gen("x", max_tokens=2)
        assert s["x"]  # a sync point: two segments, so two rounds per program
        s += "\nMore:" + llmir.gen("y", max_tokens=2)
        ended.append(i)

    return item


def _settled(ended: list[int]) -> int:
    """How many programs have ended once the count stops moving for 0.3 s."""
    before = -1
    while before != len(ended):
        before = len(ended)
        time.sleep(0.3)
    return before


def test_closing_the_iterator_stops_the_programs_not_read(slow):
    ended: list[int] = []
    it = _counting_program(ended).run_batch(
        [{"i": i} for i in range(N)], backend=slow, generator_style=True, num_threads=2
    )
    first = next(it)
    assert first.error() is None and first["y"] is not None
    it.close()
    stopped = len(ended)
    assert _settled(ended) == stopped < N  # nothing ran on after close()
    assert not [t for t in threading.enumerate() if t.name.startswith("llmir-batch")]
    with pytest.raises(StopIteration):
        next(it)


def test_dropping_an_unread_iterator_stops_the_batch(slow):
    ended: list[int] = []
    it = _counting_program(ended).run_batch(
        [{"i": i} for i in range(N)], backend=slow, generator_style=True, num_threads=2
    )
    del it
    assert _settled(ended) < N


def test_breaking_out_of_the_loop_stops_the_batch(slow):
    ended: list[int] = []
    program = _counting_program(ended)
    batch = [{"i": i} for i in range(N)]
    for st in program.run_batch(batch, backend=slow, generator_style=True, num_threads=2):
        assert st.error() is None
        break
    assert _settled(ended) < N


def test_states_already_yielded_are_not_kept(slow):
    ended: list[int] = []
    it = _counting_program(ended).run_batch(
        [{"i": i} for i in range(N)], backend=slow, generator_style=True, num_threads=2
    )
    st = next(it)
    ref = weakref.ref(st)
    del st
    # the worker thread that ran it may still hold it in a local for a moment (until it takes its
    # next program); the batch itself must not keep it
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        if ref() is None or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert ref() is None  # the batch still runs, and does not hold the state the consumer dropped
    rest = list(it)
    assert len(rest) == N - 1 and all(s.error() is None for s in rest)
    assert [int(s.text().split(":")[0].split()[1]) for s in rest] == list(range(1, N))  # input order


def test_a_batch_read_to_the_end_is_unaffected(fake):
    ended: list[int] = []
    program = _counting_program(ended)
    states = list(program.run_batch([{"i": i} for i in range(8)], backend=fake, generator_style=True))
    assert sorted(ended) == list(range(8))
    assert [s.text() for s in states] == [
        s.text() for s in program.run_batch([{"i": i} for i in range(8)], backend=fake)
    ]


def test_a_script_that_leaves_the_loop_and_ends_exits(tmp_path):
    """A script whose last act is to leave a ``generator_style`` loop early (the iterator stays in
    a module global, never closed) exits: the iterator dropped while the interpreter finalizes
    must not start a thread (its start never returned: the script hung at exit)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "leave.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import llmir_lang as llmir\n"
        "from fake_backend import FakeBackend\n\n"
        "@llmir.function\n"
        "def f(s, i):\n"
        "    s += f'Item {i}:' + llmir.gen('a', max_tokens=3)\n\n"
        "states = f.run_batch([{'i': i} for i in range(40)], backend=FakeBackend(delay=0.05),\n"
        "                     generator_style=True, progress_bar=True)\n"
        "for st in states:\n"
        "    print('first', st.error())\n"
        "    break\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "first None"
