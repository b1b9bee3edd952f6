"""``run_batch``: a program that stays in Python between two sync points (a tool call, a slow
lookup) does not hold the other programs of the batch back."""

from __future__ import annotations

import threading

import llmir_lang as llmir
from llmir_lang.dsl import runner


def test_a_program_busy_in_python_does_not_stall_the_others(fake):
    others_done = threading.Event()
    finished: list[int] = []
    lock = threading.Lock()
    n = 8

    @llmir.function
    def item(s, i):
        s += f"Item {i}:" + llmir.gen("x", max_tokens=2)
        s["x"]  # a sync point: every program has two segments, so two rounds at least
        if i == 0:  # a long "tool call", which ends once the others have finished
            assert others_done.wait(timeout=10), "the other programs waited for this one's Python"
        s += "\nNext:" + llmir.gen("y", max_tokens=2)
        s["y"]
        with lock:
            finished.append(i)
            if len(finished) == n - 1 and 0 not in finished:
                others_done.set()

    states = item.run_batch([{"i": i} for i in range(n)], backend=fake)
    assert [st.error() for st in states] == [None] * n
    assert finished[-1] == 0


def test_programs_that_reach_their_sync_points_together_share_one_round(fake, monkeypatch):
    # a long wait: only ``no program executing Python`` may start the round here
    monkeypatch.setattr(runner, "ROUND_WAIT_S", 30.0)

    @llmir.function
    def item(s, i):
        s += "Shared few-shot text. " * 4 + f"Item {i}:" + llmir.gen("x", max_tokens=2)

    states = item.run_batch([{"i": i} for i in range(8)], backend=fake)
    assert states[0].run_stats()["rounds"] == 1
