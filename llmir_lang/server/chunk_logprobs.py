"""Logprobs for streamed chunks: ``LoggedChunk`` and how a stream's chunks get their tokens'
logprobs from the engine's record of the request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmir_lang.executor.request import StreamChunk
from llmir_lang.server.convert import TopAligner


@dataclass(slots=True)
class LoggedChunk(StreamChunk):
    """A ``StreamChunk`` of a request with ``return_logprob``, with the logprobs (and top
    alternatives, when asked) of the tokens ``logprob_ids``: every token whose logprob was not sent
    yet. They can lag behind ``token_ids`` (the first chunk comes before the engine's record of
    the request can be read); the final ``GenerateResult`` has them all."""

    logprob_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] | None = None


class _ChunkLogprobs:
    """Attaches to each chunk of one stream the logprobs of its tokens not sent yet, read from
    the engine's record of the request (on the engine thread, where the engine writes it, between
    steps). The record is not in the scheduler's lists while the request's prompt is being
    prefilled, so the first chunk's logprobs usually come with the second."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.req: Any = None
        self.sent = 0  # tokens whose logprobs were attached
        self.tops = TopAligner()

    def attach(self, chunk: StreamChunk) -> StreamChunk:
        if self.req is None:
            self.req = next((r for r in self.engine.scheduler.all_requests() if r.rid == chunk.rid), None)
            if self.req is None:
                return chunk
        req = self.req
        # NOTE: the tokens are the record's, as its logprobs are. A jump-forward that re-tokenizes
        # the output's end with the forced text ("f" + "alse" -> "false") streams its chunk before
        # the new tokens replace the old ones (``rebase_to``, applied after the step): the chunk's
        # token_ids still had the sampled "f", which was paired with the logprob and alternatives
        # of "false", and the streamed tokens no longer spelled the text nor matched the answer.
        ids = req.rebase_to[1] if req.rebase_to is not None else req.output_ids
        end = min(len(req.out_logprobs), len(ids))
        start, self.sent = self.sent, max(self.sent, end)
        new_ids = list(ids[start:end])
        tops = None
        if req.params.top_logprobs_num:  # one list per token, also for jump-forward's tokens
            tops = self.tops.take(
                new_ids, req.out_logprobs[start:end], req.out_top_logprobs, len(req.out_logprobs)
            )
        return LoggedChunk(
            chunk.rid,
            chunk.text,
            chunk.token_ids,
            chunk.finished,
            chunk.finish_reason,
            chunk.index,
            logprob_ids=new_ids,
            logprobs=list(req.out_logprobs[start:end]),
            top_logprobs=list(tops) if tops is not None else None,
        )
