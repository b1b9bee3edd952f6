"""Stop strings and stop regexes over text that grows a token at a time (``engine_text.stop_hit``
and the stream's hold-back, ``visible_len``) against ``re`` on the whole text at every token."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from llmir_lang.executor.engine_text import stop_hit, visible_len
from llmir_lang.executor.sampling_params import SamplingParams

PATTERNS = [
    r"ab", r"a+b", r"a+", r"\n+", r"ab|abcd", r"a(?!b)", r"a(?=bc)", r"(?<=a)b", r"(?<!a)b",
    r"b\b", r"\bab", r"a\Z", r"a.*?c", r"a.*c", r"(ab)+c", r"a{2,3}", r"c(?=a)", r"\n(?=b)",
    r"(?m)^b", r"(?s)a.c", r"x?c", r"\d+\.",
]  # fmt: skip


@dataclass
class _Req:  # the fields stop_hit and visible_len read and write
    params: SamplingParams
    text: str = ""
    matched_stop: str | None = None
    stop_regex_scan: list[int] = field(default_factory=list)
    stop_regex_floor: int = 0
    stop_seen: int = 0


def _run(params: SamplingParams, chunks: list[str]) -> tuple[str, str | None, int, str]:
    """(text, matched, tokens taken, text streamed before the end), as the engine appends."""
    req = _Req(params)
    streamed = ""
    for k, chunk in enumerate(chunks, 1):
        req.text += chunk
        if stop_hit(req, k < params.min_new_tokens):
            return req.text, req.matched_stop, k, streamed
        streamed = req.text[: max(len(streamed), visible_len(req))]
    return req.text, None, len(chunks), streamed


def _reference(
    pats: list[str], stops: list[str], chunks: list[str], min_new: int
) -> tuple[str, str | None, int]:
    """The first token after which the text holds a match (of a regex, or a stop string) that ends
    after the text of the first min_new - 1 tokens; cut at the earliest such match's start."""
    held = len("".join(chunks[: max(min_new - 1, 0)]))
    text = ""
    for k, chunk in enumerate(chunks, 1):
        text += chunk
        if k < min_new:
            continue
        hits = []  # on a tie a stop string wins, then the first pattern
        for s in stops:
            i = text.find(s, max(0, held - len(s) + 1))
            if i >= 0:
                hits.append((i, s))
        for p in pats:
            c = re.compile(p)
            for q in range(len(text) + 1):
                m = c.match(text, q)
                if m is not None and (m.end() > held or not held):
                    hits.append((q, p))
                    break
        if hits:
            q, what = min(hits, key=lambda h: h[0])
            return text[:q], what, k
    return text, None, len(chunks)


chunk_st = st.text(alphabet="abcx\n .1", min_size=0, max_size=3)


@settings(max_examples=400, deadline=None)
@given(
    pats=st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2, unique=True),
    stops=st.lists(st.sampled_from(["ab", "c\n", "xx"]), max_size=1),
    chunks=st.lists(chunk_st, min_size=1, max_size=8),
    min_new=st.sampled_from([0, 0, 2, 3]),
)
def test_stops_match_re_on_the_whole_text_at_every_token(pats, stops, chunks, min_new):
    params = SamplingParams(stop_regex=pats, stop=stops, min_new_tokens=min_new, max_new_tokens=100)
    text, matched, k, streamed = _run(params, chunks)
    assert (text, matched, k) == _reference(pats, stops, chunks, min_new)
    assert text.startswith(streamed)  # the stream never showed text the cut took back


def test_a_lookahead_confirmed_by_a_later_token_stops():
    # the match "\n" ends before the "Q" that confirms it, in the token after it
    text, matched, k, _ = _run(SamplingParams(stop_regex=r"\n(?=Q)"), [" 7", "\n", "Q", ":"])
    assert (text, matched, k) == (" 7", r"\n(?=Q)", 3)


def test_a_match_begun_in_held_back_text_counts_once_it_ends_after_it():
    chunks = ["The", " Answer", ":", " 4", "2", " because"]
    text, matched, k, _ = _run(SamplingParams(stop_regex=r"Answer: \d+", min_new_tokens=5), chunks)
    assert (text, k) == ("The ", 5)
    # one that ends inside the held-back text never stops the output
    text, matched, k, _ = _run(SamplingParams(stop_regex=r"Answer", min_new_tokens=5), chunks)
    assert matched is None and k == len(chunks)


def test_the_stream_holds_back_only_a_possible_match():
    req = _Req(SamplingParams(stop_regex=r"\d+\.\d"))
    req.text = "cost 12"
    assert not stop_hit(req, False) and visible_len(req) == len("cost ")
    req.text += "x"
    assert not stop_hit(req, False) and visible_len(req) == len(req.text)
