"""Request counters of ``Engine.stats()["requests"]``: how many requests were submitted, and how
each one ended, counted once when the engine resolves it.

What counts as one request: each queued engine request, so a ``submit`` / ``generate`` prompt is
one, a chain (``submit_chain``) is one whatever its number of generations, and a ``score`` call is
one prefill-only request, plus one per continuation of two or more tokens after the first such one
(they end with finish reason "length"). A request refused at submission (bad input, a shut-down
engine) raises there and is not counted.

How it ended:

- ``finished[reason]``: its future got a result with that finish reason ("stop", "length",
  "abort": ``abort()``, ``future.cancel()``, a stream closed early; "constraint_error": the
  constraint admitted no token). A request whose future was cancelled counts as "abort".
- ``failed``: its future raised (an ``EngineError`` naming the cause, ``EngineClosedError`` for one
  still running at ``shutdown()``, ``OutOfKVMemoryError``), or its result carries finish reason
  "error" (a chain's next generation refused).

``in_flight`` is what is neither (queued, running, or its result not delivered yet), so
``submitted == sum(finished.values()) + failed + in_flight`` holds at every read.
"""

from __future__ import annotations

from typing import Any

from llmir_lang.executor.request import FinishReason, Req

_FINISHED = (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT, FinishReason.CONSTRAINT_ERROR)


class RequestCounts:
    """Submitted on any thread (under the engine's inbox lock), ended on the engine thread (or in
    ``Engine.__del__`` once that thread is gone): each counter has one writing thread at a time."""

    __slots__ = ("submitted", "failed", "finished")

    def __init__(self) -> None:
        self.submitted = 0
        self.failed = 0
        self.finished: dict[str, int] = {r.value: 0 for r in _FINISHED}

    def end(self, req: Req, reason: FinishReason | None) -> None:
        """Count ``req`` as ended with ``reason`` (None: its future raised); a second call for the
        same request is ignored, so every path that resolves a future may call it."""
        if req.counted:
            return
        req.counted = True
        if req.future.cancelled():
            reason = FinishReason.ABORT  # the caller gave up on it: it never saw a result or an error
        if reason is None or reason not in _FINISHED:
            self.failed += 1
        else:
            self.finished[reason.value] += 1

    def snapshot(self) -> dict[str, Any]:
        finished = dict(self.finished)
        ended = sum(finished.values()) + self.failed
        return {
            "submitted": self.submitted,
            "finished": finished,
            "failed": self.failed,
            "in_flight": self.submitted - ended,
        }
