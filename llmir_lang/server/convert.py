"""Wire formats <-> engine records: constraint fields to specs, finish reasons, logprobs, SSE.

Shared by the SGLang and OpenAI routes so that the same request means the same thing on both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmir_lang.errors import InvalidRequestError
from llmir_lang.executor.request import GenerateResult
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.tokenizer import run_text
from llmir_lang.server.errors import (
    ClientDisconnectedError,
    ServerHTTPError,
    blame,
    code_of,
    error_body,
    status_of,
    with_param,
)

DISCONNECT_POLL_S = 0.25  # how often a request waiting on the engine checks that its client is there


def constraint_spec(given: Sequence[tuple[str, Any, str]]) -> tuple[Any, str | None]:
    """The ``ConstraintSpec`` of at most one constraint field, and the request field it came from;
    ``(None, None)`` when none is given.

    ``given``: ``(kind, value, field)`` per constraint field of the request, ``kind`` one of
    ``regex``, ``json_schema``, ``grammar``, ``choices``, ``field`` its name in the request (the
    ``param`` of its errors); a None value is a field not given. Two given fields are a 400 naming
    the second. ``grammar`` is llguidance lark text or GBNF/EBNF (``root ::= ...``), converted to
    lark. Invalid regexes, schemas and grammars raise typed ``ConstraintError``s (400) naming their
    field; so does compiling the spec later, where ``Submission.constraint_param`` carries it.
    """
    present = [(kind, value, field) for kind, value, field in given if value is not None]
    if not present:
        return None, None
    if len(present) > 1:
        names = [field for _, _, field in present]
        raise ServerHTTPError(
            400,
            f"give at most one constraint, got {' and '.join(names)}; drop all but one",
            param=names[1],
        )
    from llmir_lang.executor import constraints as C

    ((kind, value, field),) = present
    with blame(field):
        if kind == "regex":
            return C.spec_from_regex(value), field
        if kind == "json_schema":
            return C.spec_from_json_schema(value), field
        if kind == "choices":
            return C.spec_from_choices(value), field
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        try:
            lark = any_to_lark(value)
        except GbnfToLarkError as e:
            raise C.GrammarSyntaxError(
                f"the grammar is neither lark nor GBNF/EBNF that converts to lark: {e}"
            ) from None
        except Exception as e:
            # NOTE: the converter checks the rules it parsed with bare Exceptions (no 'root' rule,
            # an empty grammar, a reference to a rule that is not defined, two rules whose names
            # clash in lark): bad input, not a server failure (they were 500s)
            raise C.GrammarSyntaxError(
                f"the GBNF grammar does not convert to lark: {e}; define a 'root ::= ...' rule and "
                "every rule it refers to (or send lark, with a 'start: ...' rule)"
            ) from None
        return C.spec_from_grammar(lark), field


def sampling_params(fields: Sequence[tuple[str, Any, str | None]]) -> SamplingParams:
    """``SamplingParams`` from ``(engine field, value, request field)`` triples.

    The engine checks the values; one it refuses is its ``InvalidRequestError`` naming the request
    field the value came from (``param``). The engine's error does not say which field it is
    about, so on a refusal the fields are checked again one more at a time, in the given order
    (``max_new_tokens`` before ``min_new_tokens``: the first field whose value the fields before it
    cannot take is the one at fault, the later of two that conflict), and that field's own error is
    raised. A valid request pays for one construction only."""
    try:
        return SamplingParams(**{name: value for name, value, _ in fields})
    except InvalidRequestError as e:
        refused = e
    so_far: dict[str, Any] = {}
    for name, value, field in fields:
        so_far[name] = value
        try:
            SamplingParams(**so_far)
        except InvalidRequestError as e:
            raise with_param(e, field) from None
    raise refused  # not one field's (it should not happen: the last check is the whole set)


def stop_list(stop: str | list[str] | None) -> list[str]:
    """``stop`` (or ``stop_regex``) as a list. ``""`` is a stop string like any other (not "no
    stop"), so ``"stop": ""`` and ``"stop": [""]`` are refused alike (a 400 from the sampling
    parameters' checks), and so are ``"stop_regex": ""`` and ``[""]`` (it matches the empty
    string)."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def sglang_finish_reason(res: GenerateResult) -> dict[str, Any]:
    """SGLang's ``meta_info.finish_reason`` object."""
    if res.finish_reason == "stop":
        return {"type": "stop", "matched": res.matched_stop}
    if res.finish_reason == "length":
        return {"type": "length", "length": res.completion_tokens}
    out: dict[str, Any] = {"type": res.finish_reason}
    if res.error:
        out["message"] = res.error
    return out


def token_text(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([t], skip_special_tokens=False) for t in ids]


def token_bytes(tokenizer: Any, token: int, text: str | None = None) -> list[int]:
    """The token's own bytes (OpenAI's ``logprobs.content[i].bytes``): a byte-level token that
    holds part of a multi-byte character is its raw bytes, not the UTF-8 of the U+FFFD its text
    decodes to, so joining the ``bytes`` of every token gives the generated text back. Falls back
    to the UTF-8 of the token's text where the tokenizer's decode has no byte table."""
    tb = tokenizer.text_bytes() if hasattr(tokenizer, "text_bytes") else None
    if tb is not None and 0 <= token < len(tb.table):
        return list(tb.table[token])
    if text is None:
        text = tokenizer.decode([token], skip_special_tokens=False)
    return list(text.encode())


class TopAligner:
    """One list of top alternatives per generated token, over a growing output (a stream) or a
    whole one (``align_top_logprobs``).

    The engine records one list per output token, a token jump-forward forced included (logprob
    0.0 and ``[(token, 0.0)]``: the constraint admits nothing else), and then every token gets its
    own list. Lists with gaps (the engine before it recorded forced tokens' lists; a path that
    skips them) are walked in order with a pointer: a token with logprob 0.0 whose recorded list
    does not start with itself at 0.0 (or for which none is recorded) was forced, and gets
    ``[(token, 0.0)]``; read as is, every later token would get another token's alternatives."""

    def __init__(self) -> None:
        self.used = 0  # recorded lists consumed

    def take(
        self, ids: list[int], lps: list[float], recorded: list, total: int | None = None
    ) -> list[list[tuple[int, float]]]:
        """Top alternatives of ``ids`` (the next tokens, with their logprobs ``lps``), from
        ``recorded``: every list recorded so far. ``total``: the number of tokens recorded so far
        (when it equals ``len(recorded)``, nothing was forced)."""
        out: list[list[tuple[int, float]]] = []
        for t, lp in zip(ids, lps):
            i = self.used
            if total is not None and total == len(recorded):
                forced = False
            else:
                forced = lp == 0.0 and (i >= len(recorded) or not _is_certain(recorded[i], t))
            if forced or i >= len(recorded):
                out.append([(t, 0.0)] if lp == 0.0 else [])
            else:
                out.append(list(recorded[i]))
                self.used += 1
        return out


def _is_certain(top: list[tuple[int, float]], token: int) -> bool:
    return bool(top) and top[0][0] == token and top[0][1] == 0.0


def align_top_logprobs(
    ids: list[int], lps: list[float] | None, tops: list | None
) -> list[list[tuple[int, float]]] | None:
    """``tops`` with one entry per token of ``ids`` (see ``TopAligner``); None stays None."""
    if tops is None:
        return None
    if len(tops) == len(ids):
        return [list(t) for t in tops]
    lps = list(lps or [])
    lps += [None] * (len(ids) - len(lps))  # type: ignore[list-item]
    return TopAligner().take(ids, lps, tops, total=len(ids))


def sglang_logprobs(
    res: GenerateResult, tokenizer: Any, prompt_ids: list[int] | None, start: int, with_text: bool
) -> dict[str, Any]:
    """``input_token_logprobs`` / ``output_token_logprobs`` / ``output_top_logprobs`` entries are
    ``[logprob, token_id, text_or_None]``; the input list starts at ``logprob_start_len`` and its
    first entry has no logprob (nothing precedes it in the scored range)."""

    def entry(lp: float | None, tid: int) -> list[Any]:
        return [lp, tid, tokenizer.decode([tid], skip_special_tokens=False) if with_text else None]

    out: dict[str, Any] = {
        "output_token_logprobs": [entry(lp, t) for lp, t in zip(res.logprobs or [], res.token_ids)]
    }
    tops = align_top_logprobs(res.token_ids, res.logprobs, res.top_logprobs)
    if not res.token_ids and res.top_logprobs:
        # nothing generated (max_new_tokens 0): the engine's one entry is the next token's
        # alternatives, as SGLang reports them (its cot_decoding reads output_top_logprobs[0])
        tops = [list(res.top_logprobs[0])]
    if tops is not None:
        out["output_top_logprobs"] = [[entry(lp, t) for t, lp in top] for top in tops]
    if res.prompt_logprobs is not None and prompt_ids is not None and 0 <= start < len(prompt_ids):
        out["input_token_logprobs"] = [entry(None, prompt_ids[start])] + [
            entry(lp, t) for t, lp in res.prompt_logprobs
        ]
    return out


def text_offsets(
    tokenizer: Any,
    ids: list[int],
    base: int = 0,
    start: int = 0,
    skip: frozenset[int] | set[int] = frozenset(),
) -> list[int]:
    """Character offset of each token of ``ids[start:]`` in the text of ``ids``: the length of the
    text of the tokens before it, as decoding that prefix gives it (so a token that ends inside a
    character split over several byte tokens counts its U+FFFD). Tokens in ``skip`` (the special
    tokens, where the text is decoded without them) have no text: each is at the offset where the
    text goes on."""
    offsets = TextOffsets(tokenizer, skip)
    offsets.extend(ids[:start])
    return [base + o for o in offsets.extend(ids[start:])]


class TextOffsets:
    """``text_offsets`` over a growing token sequence (a stream): ``extend(ids)`` returns the
    offsets of the new tokens. Linear in the tokens where the tokenizer's decode has the form
    ``Tokenizer.text_bytes`` checks (byte-level BPE, SentencePiece): text before a byte that starts
    a character (byte-level), or before a token that is not a byte-fallback one (SentencePiece), is
    final, so only the bytes since are decoded again. Other tokenizers decode every prefix."""

    def __init__(self, tokenizer: Any, skip: frozenset[int] | set[int] = frozenset()):
        self.tok = tokenizer
        self.skip = skip  # tokens without text here (see text_offsets)
        self._tb = tokenizer.text_bytes() if hasattr(tokenizer, "text_bytes") else None
        self.ids: list[int] = []  # every token so far (the prefix-decoding path reads them)
        self._chars = 0  # characters of the final text
        self._first = ""  # its first character
        self._pending = b""  # bytes after it: since the last character start, or the open byte run
        self._run = 0  # tokens in the open byte run (SentencePiece)
        self._length = 0  # text length of every token so far

    def extend(self, ids: list[int]) -> list[int]:
        out = []
        for t in ids:
            out.append(self._length)
            if t in self.skip:
                continue
            self.ids.append(t)
            self._length = self._advance(t)
        return out

    def _advance(self, token: int) -> int:
        tb = self._tb
        if tb is None or not 0 <= token < len(tb.table):
            self._tb = None  # an id the table lacks: decode prefixes from here on
            return len(self.tok.decode(self.ids, skip_special_tokens=False))
        b = tb.table[token]
        if tb.fallback:
            if token in tb.fallback:
                self._pending += b
                self._run += 1
            else:
                if self._run:
                    self._final(run_text(self._pending, self._run))
                    self._pending, self._run = b"", 0
                self._final(b.decode("utf-8", "replace"))
            rest = run_text(self._pending, self._run) if self._run else ""
        else:
            pending = self._pending + b
            cut = len(pending) - 1
            while cut > 0 and pending[cut] & 0xC0 == 0x80:  # continuation bytes go with their lead
                cut -= 1
            if cut > 0:
                self._final(pending[:cut].decode("utf-8", "replace"))
                pending = pending[cut:]
            self._pending = pending
            rest = pending.decode("utf-8", "replace")
        n = self._chars + len(rest)
        if tb.strip and (self._first or rest[:1]) == " ":  # decode drops the text's leading space
            n -= 1
        return n

    def _final(self, text: str) -> None:
        if text and not self._first:
            self._first = text[0]
        self._chars += len(text)


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A server-sent-events response over ``events`` (dicts), ended by ``data: [DONE]``.

    An error after the stream started goes out as one ``{"error": ...}`` event (the status line
    is already sent). Whatever ends the response (done, client gone, server stopping), the event
    generator is closed, and ``on_close`` runs, so an unfinished request is always aborted; a
    client that leaves is seen at once, also before the first event.
    """

    def __init__(self, events: AsyncIterator[dict[str, Any]], on_close: Callable[[], None] | None = None):
        self._events = events
        self._on_close = on_close
        super().__init__(
            self._frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _frames(self) -> AsyncIterator[str]:
        try:
            async for event in self._events:
                yield sse(event)
        except Exception as e:
            _, kind = status_of(e)
            yield sse(error_body(str(e), kind, getattr(e, "param", None), code_of(e)))
        yield "data: [DONE]\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Listen for the client leaving between events too. Starlette does so only below ASGI spec
        # 2.4; at 2.4 (what uvicorn speaks) it relies on a failing send, and uvicorn's h11 send
        # returns quietly once the client is gone, so a client that left mid-stream was noticed
        # late or not at all while its request kept generating.
        scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # closing after a failure: the failure was already reported
                    pass
            if self._on_close is not None:
                self._on_close()


async def prime(events: AsyncIterator[Any], request: Any = None) -> AsyncIterator[Any]:
    """Run ``events`` up to its first item now, so that bad input (raised when the request is
    submitted) becomes an HTTP error status instead of an error event inside a 200 stream.

    Until that first item (a whole prefill, or a wait in the queue) no response exists to notice
    the client leaving, so ``request``'s client is checked every ``DISCONNECT_POLL_S``: if it is gone, the
    events are closed (which aborts the request) and ``ClientDisconnectedError`` is raised."""
    pending = asyncio.ensure_future(events.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if request is not None and await request.is_disconnected():
                raise ClientDisconnectedError("the client disconnected before the first token; aborted")
    except BaseException:  # the client left, or this task was cancelled (a server shutting down)
        # the events' own task is not cancelled with this one: cancel it, and let the events
        # run their cleanup (which aborts the request) before going on
        pending.cancel()
        await asyncio.wait({pending})
        if not pending.cancelled():
            pending.exception()  # read: what it raised meanwhile is superseded by this exit
        await events.aclose()  # type: ignore[attr-defined]
        raise
    first = pending.result()

    async def chained() -> AsyncIterator[Any]:
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return chained()
