"""Text work after a step (stop strings, streaming, results) and its deferral behind the next step.

On CUDA ``ModelRunner.run`` only launches the forward, so the host is free until the next step's
sampling waits for its tokens. ``OutputProcessor.append`` decides everything that steers the engine
(the token, the finish reason, constraint state) at once and, for a request whose control flow never
reads its text, queues the text work here: decode the step's token, stream the new text, and for a
finished request flush the decoder, build its ``GenerateResult`` and resolve its future.
``EngineLoop._step`` flushes the queue right after the next step's forward is launched.

Invariants:

- A queued request's ``output_ids`` do not change until its item is flushed: the loop flushes
  before every ``process`` (which is what appends tokens), and requests that rebase their output
  (jump-forward, chains) or read their text (stop strings) never defer.
- Items are flushed in the order they were queued, so each request's stream chunks keep their order;
  the next step's items are queued only after the previous step's were flushed.
- Anything that ends requests outside ``process`` (``finish``/``fail``, an idle engine, shutdown,
  recovery) flushes first, so no future waits on text work that would never run.
"""

from __future__ import annotations

import os
from collections import deque
from typing import TYPE_CHECKING

import regex

from llmir_lang.errors import EngineError
from llmir_lang.executor.request import FinishReason, GenerateResult, Req, StreamChunk
from llmir_lang.executor.sampling_params import compile_stop_regex

if TYPE_CHECKING:
    from llmir_lang.executor.engine_output import OutputProcessor

DEFER_ENV = "LLMIR_DEFER_TEXT"


def defer_text_default(device_type: str) -> bool:
    """Whether an engine on ``device_type`` defers text work. On the CPU the forward is synchronous,
    so there is nothing to overlap with: immediate. ``LLMIR_DEFER_TEXT=1`` / ``=0`` overrides (tests
    run the deferred path on the CPU; A/B timings on the GPU)."""
    forced = os.environ.get(DEFER_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return device_type == "cuda"


class DeferredText:
    """FIFO of ``(req, reason, decode)`` items: ``decode`` says the request appended a token whose
    text is not decoded yet; ``reason`` (not None) says the request finished with it and its result
    is still to be delivered."""

    __slots__ = ("out", "_items")

    def __init__(self, out: OutputProcessor):
        self.out = out
        self._items: deque[tuple[Req, FinishReason | None, bool]] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, req: Req, reason: FinishReason | None, decode: bool) -> None:
        self._items.append((req, reason, decode))

    def flush(self) -> None:
        """Run every queued item, oldest first.

        Re-entrant: a stream callback may end requests (``Engine.abort``), which flushes the rest of
        the queue from inside this loop; items are popped before they run, so none runs twice. If an
        item raises, its request's future fails with the error (it could never resolve otherwise) and
        the error propagates (the loop's recovery then flushes or drops the items after it).
        """
        items = self._items
        out = self.out
        while items:
            req, reason, decode = items.popleft()
            try:
                if decode:
                    req.text += req.decoder.step(req.output_ids)
                    if reason is not None:  # deferred requests never match a stop string / regex
                        req.text += req.decoder.flush(req.output_ids)
                if reason is None:
                    stream_text(req)
                else:
                    out._finish_now(req, reason)
            except Exception as e:
                _fail_future(out, req, EngineError(f"text processing failed: {type(e).__name__}: {e}"))
                raise

    def drop(self, exc: Exception) -> None:
        """Give up on every queued item (after a flush failed): fail the futures not yet resolved."""
        while self._items:
            req, _, _ = self._items.popleft()
            _fail_future(self.out, req, exc)


def _fail_future(out: OutputProcessor, req: Req, exc: Exception) -> None:
    # the request's scheduler state is left alone: a failing step's handler (or the recovery) ends
    # the requests it holds; one that is not among them runs on to its end, its future already failed
    req.error = req.error or str(exc)
    out.counts.end(req, None)
    if not req.future.done():
        req.future.set_exception(exc)


# ---- text helpers (shared by the immediate and the deferred path) ---------------------------
def stop_hit(req: Req, gated: bool) -> bool:
    """Whether the text appended since the previous check ends the output at a stop string or a
    stop regex's match; on a hit cut the text where the earliest one starts and record it (the
    string, or the regex's pattern) in ``matched_stop``. ``gated``: fewer than ``min_new_tokens``
    tokens are out, so nothing stops yet, and what is out so far is never searched again.

    "Since the previous check" (``req.stop_seen``), not "since this token": jump-forward appends
    forced text after a check, and a stop inside it ends the output at the next check (the text
    cut inside the forced text), as it ends it with jump-forward off.
    """
    p = req.params
    hits = []
    if not gated:
        if p.stop:
            hits.append(_stop_string_at(req.text, p.stop, min(req.stop_seen, len(req.text))))
        if p.stop_regex:
            hits.append(_stop_regex_at(req))
    else:
        req.stop_regex_floor = len(req.text)
    req.stop_seen = len(req.text)
    best = min((h for h in hits if h is not None), default=None, key=lambda h: h[0])
    if best is None:
        return False
    req.text = req.text[: best[0]]
    req.matched_stop = best[1]
    return True


def forced_stop_hit(req: Req, n_out: int) -> bool:
    """``stop_hit`` over the text appended after the last check, where there is some: the text
    jump-forward forced (``force_start``'s too). ``n_out``: output tokens up to its end.

    The request's next check searches it, but the request may end before that check: an abort (a
    stream callback), forced text that completes the constraint, an EOS or a stop token id sampled
    next (those end the output ahead of the stop strings), a dead end of the constraint. Each of
    those reported the forced text uncut, stop string included; they call this first.
    """
    p = req.params
    if not (p.stop or p.stop_regex) or req.stop_seen >= len(req.text):
        return False
    return stop_hit(req, n_out < p.min_new_tokens)


def _stop_string_at(text: str, stops: list[str], since: int) -> tuple[int, str] | None:
    """The earliest stop string that ends after ``since`` (it may straddle it): (where it starts,
    the string). The text before ``since`` was searched already, or was held by
    ``min_new_tokens``: a stop string inside it never stops (one window for all the strings, as
    long as the longest, found a short one there and cut the text at it after the stream had
    shown it)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, since - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _stop_regex_at(req: Req) -> tuple[int, str] | None:
    """The earliest of each ``stop_regex`` pattern's leftmost match, less matches that end in the
    text ``min_new_tokens`` held back (``req.stop_regex_floor``): (where it starts, the pattern).

    Each pattern's search starts at ``req.stop_regex_scan[i]``, the start of its leftmost partial
    match at the previous check (a match starting before it would have been a partial match then),
    or the text's end where there was none; so a check reads only the text a match may still use,
    and the stream holds back exactly the text from there on (``visible_len``). The scan starts at
    0 at the first check after the gate, so a match that began in held-back text and ends after it
    counts (``Answer: \\d+`` over a held ``Answer: 4`` and a new ``2``).
    """
    pats = req.params.stop_regex
    text = req.text
    scan = req.stop_regex_scan
    if len(scan) != len(pats):
        scan[:] = [0] * len(pats)
    floor = req.stop_regex_floor
    best: tuple[int, str] | None = None
    for i, pat in enumerate(pats):
        compiled = compile_stop_regex(pat)
        pos = min(scan[i], len(text))
        m = compiled.search(text, pos)
        while floor and m is not None and m.end() <= floor:  # a match inside held-back text
            m = compiled.search(text, m.start() + 1) if m.start() < len(text) else None
        if m is not None:
            if best is None or m.start() < best[0]:
                best = (m.start(), pat)
            continue
        scan[i] = _partial_start(compiled, text, pos)
    return best


def _partial_start(compiled: regex.Pattern, text: str, pos: int) -> int:
    """Where the leftmost match of ``compiled`` at or after ``pos`` that the text's end cuts short
    starts (``len(text)`` if none): the text from there may still become a match. A whole match on
    the way (one in held-back text) is stepped over unless a longer match may still grow from its
    start (``a.*c`` over ``ac b``: the ``regex`` module reports the whole match, not the partial)."""
    while pos <= len(text):
        m = compiled.search(text, pos, partial=True)
        if m is None:
            break
        if m.partial or compiled.fullmatch(text, m.start(), partial=True) is not None:
            return m.start()
        pos = m.start() + 1
    return len(text)


def visible_len(req: Req) -> int:
    """Text that cannot turn out to be the start of a stop string or a stop regex's match."""
    text = req.text
    upto = _before_stop_prefix(text, req.params.stop)
    if req.params.stop and req.stop_seen < len(text):
        # text appended after the last check (jump-forward's forced text) is searched at the next
        # check, which may cut it: it used to be streamed, stop string included
        upto = min(upto, _before_stop_prefix(text[: req.stop_seen], req.params.stop))
    if req.params.stop_regex:
        upto = min([upto, *req.stop_regex_scan]) if req.stop_regex_scan else 0
    return upto


def _before_stop_prefix(text: str, stops: list[str]) -> int:
    """``len(text)`` less its longest end that is the start of a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


def stream_text(req: Req, final: bool = False, step_done: bool = False) -> None:
    """Send the request's stream consumer the text and tokens not sent yet (``final``: all of it
    and the finish reason; ``step_done``: a chain's generation ended, the request goes on)."""
    chunk = take_chunk(req, final, step_done)
    if chunk is not None:
        send_chunk(req, chunk)


def take_chunk(req: Req, final: bool = False, step_done: bool = False) -> StreamChunk | None:
    """The chunk ``stream_text`` would send now (None: nothing to send), counted as sent; the caller
    sends it with ``send_chunk``, possibly after changing the request (a chain's next generation)."""
    if req.stream is None:
        return None
    upto = len(req.text) if final else visible_len(req)
    # the output the text is of: a pending rebase's (jump-forward re-tokenized the sampled token
    # with the forced text, "f" + "alse" -> "false"; a chain's next generation) until the
    # scheduler applies it after the step. The old output_ids streamed "f", and "false", which
    # took its place, never went out
    ids = req.rebase_to[1] if req.rebase_to is not None else req.output_ids
    if upto <= req.sent_len and not final and len(ids) == req.sent_tokens:
        return None
    chunk = StreamChunk(
        rid=req.rid,
        text=req.text[req.sent_len : upto],
        token_ids=ids[req.sent_tokens :],
        finished=final and not step_done,
        finish_reason=req.finish_reason.value if final and req.finish_reason else None,
        index=req.chain_index,
    )
    req.sent_len, req.sent_tokens = max(req.sent_len, upto), len(ids)
    return chunk


def send_chunk(req: Req, chunk: StreamChunk) -> None:
    """Call the request's stream consumer; one that raises is dropped (a broken consumer must not
    stop the engine; the result still resolves)."""
    if req.stream is None:
        return
    try:
        req.stream(chunk)
    except Exception:
        req.stream = None


def make_result(req: Req, reason: FinishReason) -> GenerateResult:
    p = req.params
    return GenerateResult(
        rid=req.rid,
        text=req.text,
        token_ids=list(req.output_ids),
        finish_reason=reason.value,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=len(req.output_ids),
        cached_tokens=max(req.cached_prompt_tokens, 0),
        matched_stop=req.matched_stop,
        logprobs=list(req.out_logprobs) if p.return_logprob else None,
        top_logprobs=list(req.out_top_logprobs) if p.return_logprob and p.top_logprobs_num else None,
        prompt_logprobs=list(req.prompt_logprobs) if req.logprob_start_len >= 0 else None,
        error=req.error,
        meta={
            "retractions": req.retractions,
            "constraint_engine": req.constraint_engine,
            "jump_forward_tokens": req.num_forced,
            "spec_draft_tokens": req.num_draft_tokens,
            "spec_accepted_tokens": req.num_draft_accepted,
            **({"next_logprobs": req.next_logprobs} if req.next_logprobs is not None else {}),
        },
    )
