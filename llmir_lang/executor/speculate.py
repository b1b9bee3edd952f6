"""Prompt-lookup speculative decoding: draft tokens copied from the request's own tokens.

Extraction, summarizing with quotes, code edits and multi-turn chat copy long spans of their
prompt. After each sampled token the engine looks for the latest earlier occurrence of the last
``n`` tokens (``n`` from ``max_ngram`` down to ``min_ngram``) in the request's prompt and output, and proposes
the tokens that followed it as a draft. The next step computes the last token and the draft in one
extend (logits at every position); output processing samples each position and keeps the draft up
to the first position where the sampled token differs, plus that sampled token. So one forward
yields between 1 and ``len(draft) + 1`` tokens.

Exactness: position ``i``'s logits are the model's distribution given the prompt, the output and
the draft tokens before ``i``, all of which are accepted tokens when position ``i`` is read. A token
is sampled there with the request's own sampling rules (penalties over the output so far including
the accepted draft, ``min_new_tokens``, the constraint mask of the state after the accepted draft),
and the draft token is kept only if the sample equals it. Accepting a deterministic draft token
``d`` with probability ``p(d)`` and otherwise taking a sample from ``p`` conditioned on ``!= d`` is
exactly what sampling ``x ~ p`` and comparing does, so the output distribution is that of plain
decoding. Greedy output is plain greedy decoding's, up to floating-point differences between an
extend and a decode forward (the same tolerance as jump-forward). So is seeded sampling's: position
``i`` of a verify step draws from the request's generator the numbers plain decoding would draw
there, and the draws of the positions past the kept tokens are handed back
(``Sampler.replay_draws``), so the same seed gives the same tokens with or without speculation (and
so alone or in a batch too large to draft for).

After jump-forward's text (a constrained request's JSON keys and quotes), the key is only the
tokens sampled since that text, looked up in the prompt, down to the lone last token where it
occurs once there (``SpecConfig.after_forced``): the syntax recurs in the output, so a key through it
found the previous field's value, and it says nothing of where the value starts in the prompt.
On bench_json's sequential extraction that let drafts start at a value's first or second token
(one decode step fewer per copied string value): 989 -> 879 forward passes for 60 records, JSON
with jump-forward 1.08x faster (alternated over 3 rounds in one process), same outputs. A lone
token seen several times in the prompt then drafts what all its occurrences agree on
(``SpecConfig.agree``; a name mentioned twice goes on the same way both times): 879 -> 863
forward passes, 20 fewer tokens computed.

Cost rule: a verify step is an extend of ``1 + len(draft)`` tokens per request. Where the step is
bound by per-step overhead or weight reads (small batches) the extra rows cost little next to the
steps they save; in a large batch the step is compute-bound and rejected drafts are wasted work, so
drafts are used only while at most ``SchedulerConfig.spec_max_batch`` requests decode.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmir_lang.executor.engine_output import OutputProcessor
    from llmir_lang.executor.request import Req

_ITEM = array("i").itemsize


@dataclass(slots=True)
class SpecConfig:
    """``draft_tokens``: the longest draft (0 turns speculation off). ``max_ngram`` /
    ``min_ngram``: the longest and shortest suffix looked up. ``window``: only the last this many
    tokens are searched (bounds the host cost per step on long prompts)."""

    draft_tokens: int = 0
    max_ngram: int = 3
    # a single matching token predicts too little to pay for a verify step on the CPU (measured on
    # bench_json: drafts after 2- and 3-token matches only were as fast for JSON and faster for
    # free text than with 1-token matches)
    min_ngram: int = 2
    window: int = 4096
    # right after jump-forward's text, look up only the tokens sampled since (see ``propose``),
    # and where that lone token occurs several times, draft what its occurrences agree on
    after_forced: bool = True
    agree: bool = True

    @property
    def enabled(self) -> bool:
        return self.draft_tokens > 0


def lookup_draft(
    ids: Sequence[int],
    k: int,
    max_ngram: int = 3,
    window: int = 4096,
    min_ngram: int = 1,
    agree: bool = False,
) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix of
    ``ids`` (``max_ngram`` tokens down to ``min_ngram``) that occurs earlier; [] if none does, or if
    only the last token matches and it occurs more than once before. With ``agree``, a lone token
    seen more than once gives the tokens that follow all its occurrences (the latest 8), as far as
    they all go and agree; [] if the next one already differs.

    The search runs over the packed int32 bytes (``bytes.rfind``, C speed); a hit that is not on a
    token boundary is skipped.
    """
    n_ids = len(ids)
    if k <= 0 or n_ids < 2:
        return []
    start = max(0, n_ids - window)
    buf = array("i", ids[start:]).tobytes()
    n_win = n_ids - start
    for n in range(min(max_ngram, n_win - 1), min_ngram - 1, -1):
        key = buf[(n_win - n) * _ITEM :]
        at = _rfind_token(buf, key, (n_win - 1) * _ITEM)  # ends before the last token
        if at < 0:
            continue
        if n == 1 and _rfind_token(buf, key, at) >= 0:
            # a single token seen more than once predicts its continuation poorly (measured on
            # bench_json's records: 0.4 kept tokens per verify, against 1.1 for a token seen
            # once and 1.8-2.1 for a 2- or 3-token match), unless its occurrences agree
            return _agreed(ids, start, buf, key, at, k) if agree else []
        first = at // _ITEM + n  # window index of the token after the occurrence
        return list(ids[start + first : start + min(first + k, n_win)])
    return []


def _agreed(ids: Sequence[int], start: int, buf: bytes, key: bytes, at: int, k: int) -> list[int]:
    """The longest run of up to ``k`` tokens that follows every occurrence (the latest 8) of the
    one-token ``key`` (see ``lookup_draft``); an occurrence near the end bounds it by what follows
    that occurrence before the last token."""
    n_win = len(buf) // _ITEM
    common: list[int] | None = None
    seen = 0
    while at >= 0 and seen < 8:
        first = at // _ITEM + 1
        # its continuation, up to the last token (which is the key itself)
        cont = list(ids[start + first : start + min(first + k, n_win - 1)])
        if common is None:
            common = cont
        else:
            same = 0
            while same < min(len(common), len(cont)) and common[same] == cont[same]:
                same += 1
            common = common[:same]
        if not common:
            return []
        seen += 1
        at = _rfind_token(buf, key, at)
    return common or []


def _rfind_token(buf: bytes, key: bytes, end: int) -> int:
    """Byte offset of the last token-aligned occurrence of ``key`` inside ``buf[:end]``, or -1."""
    while True:
        at = buf.rfind(key, 0, end)
        if at < 0 or at % _ITEM == 0:
            return at
        end = at + len(key) - 1  # a hit across token boundaries: search left of it


def propose_all(proc: OutputProcessor, reqs: list[Req]) -> None:
    """After a step: set the draft of each request that sampled (``[]`` where it has none, or
    while more requests decode than the scheduler verifies drafts for)."""
    sched = proc.engine.scheduler
    verified = len(sched.running) <= sched.cfg.spec_max_batch
    for req in reqs:
        try:
            req.draft = propose(proc, req, proc.spec) if verified else []
        except Exception as e:  # the request's own failure (its constraint): the others go on
            req.draft = []
            proc.fail_one(req, e)


def propose(proc: OutputProcessor, req: Req, cfg: SpecConfig) -> list[int]:
    """The draft for ``req``'s next step (checked against its constraint), or [] when the request
    does not speculate: it must be about to decode one token (no forced text pending), and the
    draft stays within ``max_new_tokens`` (one token is left for the step's own sample) and the
    context."""
    if req.finished or req.rebase_to is not None:
        return []
    p = req.params
    room = min(
        p.max_new_tokens - len(req.output_ids) - 1,
        proc.engine.config.context_len - req.seq_len - 1,
        cfg.draft_tokens,
    )
    if room <= 0:
        return []
    since = len(req.output_ids) - req.forced_end
    if cfg.after_forced and req.forced_end >= 0 and since <= cfg.max_ngram:
        # Just after jump-forward's text (the constraint's syntax: a JSON key and its quotes). That
        # text, and the output before it, is syntax and earlier values, which say nothing of where
        # in the prompt this value starts, and a key reaching into them finds the previous field.
        # So the key is the tokens sampled since, down to the lone last token (where it occurs
        # more than once, what its occurrences agree on), looked up in the prompt.
        ids = req.prompt_ids + req.output_ids[req.forced_end :]
        agree = cfg.agree
        draft = lookup_draft(ids, room, since, cfg.window, 1, agree=agree)
    else:
        agree = False
        draft = lookup_draft(req.fill_ids, room, cfg.max_ngram, cfg.window, cfg.min_ngram)
    if len(draft) < room and not (agree and draft):  # an agreed draft may be shorter
        # the occurrence's continuation runs into the last tokens: a repeated short pattern
        # (JSON punctuation, a list marker) whose drafts were almost never kept (measured: 0.03
        # tokens per verify on bench_json's records, against 0.9-1.6 for full-length drafts)
        return []
    m = req.matcher
    if m is None:
        return draft
    ok = 0
    for tok in draft:  # the constraint must allow the whole draft, in order
        if m.is_terminated() or not m.advance(tok):
            break
        ok += 1
    m.rollback(ok)
    return draft[:ok]


def verify(proc: OutputProcessor, items: list[tuple[Req, int, list[int]]], logits: torch.Tensor) -> None:
    """Sample every position of each drafted request (``(req, first logits row, draft)``), keep
    the draft up to the first mismatch plus the sampled token there, and append those tokens.

    Appending stops early when the request finishes or jump-forward re-points its tokens; the
    scheduler then drops the KV of the draft tokens that did not join the output.
    """
    for req, row, draft in items:
        if req.finished:
            continue  # aborted by an earlier request's stream callback in this step
        try:
            _verify_one(proc, req, row, draft, logits)
        except Exception as e:  # the request's own failure (its constraint): the others go on
            proc.fail_one(req, e)


def _verify_one(proc: OutputProcessor, req: Req, row: int, draft: list[int], logits: torch.Tensor) -> None:
    from llmir_lang.executor.constraints import allocate_bitmask, fill_batch_bitmask

    vocab = logits.shape[-1]
    k = len(draft)
    m = req.matcher
    bitmask = None
    if m is not None:
        bitmask = allocate_bitmask(k + 1, vocab)
        for i in range(k + 1):  # row i: the constraint's state after draft[:i]
            # a dead row (a dead end, or a bound on the engine's work passed: its error names it)
            # samples -1, never draft[i]: no position past it is kept, so none is verified
            dead = bool(fill_batch_bitmask([m], bitmask[i : i + 1]))
            if dead:
                bitmask[i] = 0
            # propose checked that the constraint allows the draft; a matcher that passed a bound
            # on its work since refuses it: verify only the draft before (its append then fails
            # and names the bound)
            if dead or (i < k and not m.advance(draft[i])):
                k, draft, bitmask = i, draft[:i], bitmask[: i + 1]
                break
        m.rollback(k)
    rows = logits[row : row + k + 1]
    p = req.params
    gen = req.generator
    before = gen.get_state() if gen is not None and not p.greedy else None
    out = proc.engine.sampler.sample(
        rows,
        [p] * (k + 1),
        [req.prompt_ids] * (k + 1),
        [req.output_ids + draft[:i] for i in range(k + 1)],
        [req.generator] * (k + 1),
        bitmask=bitmask.to(rows.device) if bitmask is not None else None,
        banned_ids=[proc._banned(req, i) for i in range(k + 1)],
    )
    tokens = out.token_ids.tolist()
    n = 0
    while n < k and tokens[n] == draft[n]:
        n += 1
    req.num_draft_tokens += k
    lps = out.logprobs.tolist() if out.logprobs is not None else [None] * (k + 1)
    kept = 0
    for i in range(n + 1):
        if tokens[i] < 0 and m is not None and m.error() is None:
            # the dead row's reason went with the draft's rollback; the matcher is in that
            # state again: its row once more says why (a bound passed is remembered, not redone)
            fill_batch_bitmask([m], allocate_bitmask(1, vocab))
        proc.append(req, tokens[i], lps[i], out.top_logprobs[i] if out.top_logprobs else None)
        kept += 1
        req.num_draft_accepted += i < n
        if req.finished or req.rebase_to is not None:
            break
    if before is not None and kept < k + 1:
        # the sampler drew k + 1 positions; the ones past the kept tokens are drawn again (the
        # same numbers) by the steps that sample them for real
        proc.engine.sampler.replay_draws(gen, before, kept)
