"""Jump-forward: where a request's constraint allows exactly one continuation, that text becomes
output tokens at once (one extend computes them instead of one decode step each), before a
generation's first step too.

``OutputProcessor`` (``engine_output.py``) inherits this. Needs of the processor: ``engine``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmir_lang.executor.engine_text import stream_text
from llmir_lang.executor.request import Req, common_prefix_len

if TYPE_CHECKING:
    from llmir_lang.executor.engine import Engine


class OutputJumpForward:
    engine: Engine

    def _jump_forward(self, req: Req) -> None:
        """Where the constraint allows exactly one continuation, append it as forced tokens.

        Where the forced text is whole characters that do not join the output's last character,
        it is tokenized together with the last few generated tokens, so the tokens are the ones the
        tokenizer (and so the model) would produce for that text, not the matcher's piecewise
        spelling; the scheduler then computes them in one extend instead of one decode step each.
        Otherwise (a multi-byte character split between the output and the forced bytes, or inside
        them) the matcher's own tokens are kept, byte for byte, and the text is decoded from the
        tokens, holding back an incomplete character, as for sampled tokens. At least one token of
        ``max_new_tokens`` is left to the model (the step that samples it ends the request at the
        limit), so jump-forward never makes an output longer than asked.
        """
        m = req.matcher
        out = req.output_ids
        room = req.params.max_new_tokens - len(out) - 1
        forced = m.forced_tokens()[: max(room, 0)]
        if not forced:
            return
        for i, tok in enumerate(forced):
            if not m.advance(tok):
                m.rollback(i)
                return
        tok = self.engine.tokenizer
        dec = req.decoder
        text = tok.decode(forced, skip_special_tokens=False)
        k = min(len(out), 3)
        tail = out[len(out) - k :]
        tail_text = tok.decode(tail, skip_special_tokens=False)
        whole = (
            dec.read_offset == len(out)  # the decoder holds no incomplete character back
            and "\ufffd" not in text
            and tok.decode(tail + forced, skip_special_tokens=False) == tail_text + text
        )
        new_out: list[int] | None = None
        if whole:
            if k and tok.encode(tail_text, add_special_tokens=False) == tail:
                new_out = out[: len(out) - k] + tok.encode(tail_text + text, add_special_tokens=False)
            else:  # the tail is not canonical text: keep it as it is
                new_out = out + tok.encode(text, add_special_tokens=False)
            if len(new_out) > len(out) + len(forced):  # never more tokens than the matcher's
                new_out = None
        if new_out is None:
            whole, new_out = False, out + list(forced)
        if new_out == out:
            m.rollback(len(forced))
            return
        req.rebase_to = (list(req.prompt_ids), new_out)
        req.forced_end = len(new_out)
        if whole:
            req.text += text
            # everything up to here is decoded: restart the incremental decoder after the new tokens
            dec.prefix_offset = dec.read_offset = len(new_out)
            dec.text = req.text
        else:
            req.text += dec.step(new_out)
        if req.params.return_logprob:
            _forced_logprobs(req, out, new_out)
        req.num_forced += len(forced)
        stream_text(req)

    def force_start(self, req: Req) -> list[int]:
        """Jump-forward before a generation's first step: the text its constraint forces from the
        start (``{"name`` of a JSON object) becomes output tokens now, so the first step computes
        them with the prompt instead of sampling one and extending the rest.

        Returns the forced tokens (the request's output so far). Call it on a request with no
        output yet (a new request before it is queued; ``_next_step`` does it for a chain's next
        generation). They are the canonical tokens of the forced text alone, as with
        jump-forward off: the model's first token never merges into the prompt's tokens either.
        At least one token is left for the model to sample (a step must run to finish the
        request), and ``max_new_tokens`` is respected.
        """
        m = req.matcher
        if m is None or not self.engine.jump_forward or req.output_ids:
            return []
        forced = m.forced_tokens()[: max(req.params.max_new_tokens - 1, 0)]
        for i, tok in enumerate(forced):
            if not m.advance(tok):
                m.rollback(i)
                return []
        if forced and m.is_terminated():  # the model must write the last token: one step runs
            m.rollback(1)
            forced = forced[:-1]
        if not forced:
            return []
        req.output_ids = list(forced)
        req.forced_end = len(forced)
        # decoded as sampled tokens are: a multi-byte character the forced bytes end inside waits
        # for the model's next token instead of becoming U+FFFD
        req.text = req.decoder.step(req.output_ids)
        if req.params.return_logprob:
            _forced_logprobs(req, [], req.output_ids)
        req.num_forced += len(forced)
        return forced

    def _commit_forced(self, req: Req) -> bool:
        """Make a pending jump-forward rebase the request's output now (the request is about to
        finish, so no step will apply it). Finishing caches ``fill_ids[:kv_len]`` with that KV, so
        KV of tokens the rebase changes is given back first (jump-forward re-tokenized them with
        the forced text); False, and the rebase left to a step, where that KV is the radix
        cache's."""
        if req.rebase_to is None:
            return False
        prompt_ids, new_out = req.rebase_to
        # a verify step's KV past the output's last token holds draft tokens that were not kept
        # (dropped after the step): only the KV before it counts. Counting it made the commit fail
        # whenever a draft ran past the token that completed the constraint, and the request took
        # one more step that sampled EOS (found by tests/executor/test_stress_scheduler.py)
        valid = min(req.kv_len, req.seq_len - 1)
        in_kv = valid - len(req.prompt_ids)
        if prompt_ids != req.prompt_ids or in_kv < 0:
            return False
        # tokens with KV that the rebase changes: their KV goes too. Refusing here made the request
        # take one more step, which sampled EOS after the finished value (with ignore_eos, an EOS
        # at the end of the output)
        valid = len(req.prompt_ids) + common_prefix_len(new_out[:in_kv], req.output_ids[:in_kv])
        if req.kv_len > valid and not self.engine.scheduler.drop_kv_past(req, valid):
            return False
        req.output_ids = list(new_out)
        req.rebase_to = None
        return True


def _forced_logprobs(req: Req, out: list[int], new_out: list[int]) -> None:
    """Logprobs (and top alternatives) once the output ``out`` became ``new_out`` by forced tokens:
    the common prefix keeps its own, every token after it gets logprob 0.0 and, with
    ``top_logprobs_num``, the alternatives ``[(token, 0.0)]`` (the constraint admitted nothing
    else), so both lists keep one entry per output token. Where jump-forward re-tokenized the end
    of ``out`` together with the forced text, those tokens are new ones: the sampled tokens' entries
    are dropped with them."""
    c = common_prefix_len(out, new_out)
    lps, tops = req.out_logprobs, req.out_top_logprobs
    if len(lps) == len(out):
        del lps[c:]
    lps.extend([0.0] * (len(new_out) - len(lps)))
    if req.params.top_logprobs_num:
        if len(tops) == len(out):
            del tops[c:]
        tops.extend([(t, 0.0)] for t in new_out[len(tops) :])
