"""OpenAI's logprobs formats, of a plain answer and of a stream's chunks: the legacy object of
completions (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) and chat's
``content`` entries (``token``, ``logprob``, ``bytes``, ``top_logprobs``).

A stream tells what the plain answer does: its chunks' logprobs, joined, are the plain answer's,
also for a stream of no token (empty lists, not null).
"""

from __future__ import annotations

from typing import Any

from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.server.convert import TextOffsets, align_top_logprobs, text_offsets, token_bytes, token_text
from llmir_lang.server.service import EngineService, LoggedChunk


def completion_logprobs(
    svc: EngineService,
    res: GenerateResult,
    prompt_ids: list[int] | None,
    prompt_text: str,
    skip_special: bool,
    prompt_decoded: bool,
) -> dict[str, Any]:
    """OpenAI's legacy logprobs object; with echo (``prompt_ids`` given) it covers the prompt too,
    its first token without a logprob. ``text_offset`` counts in the answer's text: the echoed
    prompt is the prompt string as sent, or a token-id prompt decoded without special tokens
    (``prompt_decoded``); the output is decoded as ``skip_special_tokens`` says."""
    tok = svc.engine.tokenizer
    specials = tok.skipped_ids
    ids: list[int] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if prompt_ids is not None:
        ids += prompt_ids
        lps += [None] + [lp for _, lp in res.prompt_logprobs or []]
        tops += [None] * len(prompt_ids)
    ids += res.token_ids
    lps += list(res.logprobs or [None] * len(res.token_ids))
    aligned = align_top_logprobs(res.token_ids, res.logprobs, res.top_logprobs)
    for top in aligned if aligned is not None else [[]] * len(res.token_ids):
        tops.append({tok.decode([t], skip_special_tokens=False): lp for t, lp in top} or None)
    offsets = (
        text_offsets(tok, prompt_ids, skip=specials if prompt_decoded else frozenset())
        if prompt_ids is not None
        else []
    )
    base = len(prompt_text) if prompt_ids is not None else 0
    offsets += text_offsets(tok, res.token_ids, base, skip=specials if skip_special else frozenset())
    return {
        "tokens": token_text(tok, ids),
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


class StreamLogprobs:
    """Per-chunk logprobs of a stream, in the format of the plain answer (completions: the legacy
    object; chat: ``content`` entries). Chunks bring the logprobs of the tokens not covered yet
    (``LoggedChunk``, in token order); the final result brings any left, so every token gets its
    logprob once, in order; a stream of no token ends with empty ones (the plain answer's)."""

    def __init__(self, svc: EngineService, skip_special: bool = True) -> None:
        self.tok = svc.engine.tokenizer
        self.ids: list[int] = []  # tokens whose logprobs were sent
        # their text offsets in the streamed text, kept up to date (completions)
        self.offsets = TextOffsets(self.tok, self.tok.skipped_ids if skip_special else frozenset())

    def completion(self, chunk: StreamChunk) -> dict[str, Any] | None:
        if not isinstance(chunk, LoggedChunk) or not chunk.logprobs:
            return None
        return self._legacy(chunk.logprob_ids, chunk.logprobs, chunk.top_logprobs)

    def completion_rest(self, res: GenerateResult) -> dict[str, Any] | None:
        rest = self._rest(res)
        if rest is None:
            # no token at all (max_tokens 0): empty lists, as the plain answer has, not null
            return None if self.ids else self._legacy([], [], [])
        return self._legacy(*rest)

    def _rest(self, res: GenerateResult) -> tuple[list[int], list[float], list | None] | None:
        """The final result's tokens, logprobs and top alternatives not sent with a chunk yet."""
        start = len(self.ids)
        lps = (res.logprobs or [])[start:]
        if not lps:
            return None
        tops = align_top_logprobs(res.token_ids, res.logprobs, res.top_logprobs)
        return res.token_ids[start:], lps, tops[start:] if tops is not None else None

    def _legacy(self, ids: list[int], lps: list[float], tops: list | None) -> dict[str, Any]:
        offsets = self.offsets.extend(ids)
        self.ids += ids
        return {
            "tokens": token_text(self.tok, ids),
            "token_logprobs": lps,
            "top_logprobs": [
                {self.tok.decode([i], skip_special_tokens=False): v for i, v in top} or None for top in tops
            ]
            if tops is not None
            else [None] * len(ids),
            "text_offset": offsets,
        }

    def chat(self, chunk: StreamChunk) -> dict[str, Any] | None:
        if not isinstance(chunk, LoggedChunk) or not chunk.logprobs:
            return None
        self.ids += chunk.logprob_ids
        return {"content": _chat_entries(self.tok, chunk.logprob_ids, chunk.logprobs, chunk.top_logprobs)}

    def chat_rest(self, res: GenerateResult) -> dict[str, Any] | None:
        rest = self._rest(res)
        if rest is None:
            return None if self.ids else {"content": []}  # no token: as the plain answer says
        self.ids += rest[0]
        return {"content": _chat_entries(self.tok, *rest)}


def _chat_entries(tok: Any, ids: list[int], lps: list[float], tops: list | None) -> list[dict[str, Any]]:
    content = []
    tops = tops if tops is not None else []
    for k, (t, lp) in enumerate(zip(ids, lps)):
        text = tok.decode([t], skip_special_tokens=False)
        content.append(
            {
                "token": text,
                "logprob": lp,
                "bytes": token_bytes(tok, t, text),
                "top_logprobs": [
                    {
                        "token": (s := tok.decode([i], skip_special_tokens=False)),
                        "logprob": v,
                        "bytes": token_bytes(tok, i, s),
                    }
                    for i, v in (tops[k] if k < len(tops) else [])
                ],
            }
        )
    return content


def chat_logprobs(svc: EngineService, res: GenerateResult) -> dict[str, Any]:
    tops = align_top_logprobs(res.token_ids, res.logprobs, res.top_logprobs)
    entries = _chat_entries(svc.engine.tokenizer, res.token_ids, res.logprobs or [], tops)
    return {"content": entries}
