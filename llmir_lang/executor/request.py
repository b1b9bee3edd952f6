"""Request and result records shared by the scheduler, the model runner and the engine."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.executor.tokenizer import IncrementalDecoder


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop string or a stop token id
    LENGTH = "length"  # max_new_tokens or the context length
    ABORT = "abort"  # engine shut down or the request was cancelled
    ERROR = "error"  # the engine failed on this request
    CONSTRAINT_ERROR = "constraint_error"  # the constraint admitted no token


@dataclass(slots=True)
class StreamChunk:
    rid: int
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new token ids since the previous chunk
    finished: bool = False
    finish_reason: str | None = None
    index: int = 0  # which generation of a chain request the text belongs to


@dataclass(slots=True)
class GenerateResult:
    """What one request produced. ``text`` excludes a matched stop string and special tokens."""

    rid: int
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the radix cache (first admission)
    matched_stop: str | int | None = None
    logprobs: list[float] | None = None  # of each generated token
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[tuple[int, float]] | None = None  # (token, logprob) for prompt[start+1:]
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Req:
    """One request inside the engine.

    KV bookkeeping: ``kv_slots[i]`` holds the KV of token ``fill_ids[i]``. The first ``cache_len``
    slots belong to the radix cache and are protected by locking ``last_node``; the rest belong to
    this request until it is finished or retracted, when they go to the cache or back to the pool.
    """

    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    future: Future
    decoder: IncrementalDecoder
    stream: Callable[[StreamChunk], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    kv_slots: list[int] = field(default_factory=list)
    cache_len: int = 0
    last_node: Any = None
    cached_prompt_tokens: int = -1  # -1 until first admitted
    logprob_start_len: int = -1  # >= 0: compute prompt logprobs from this position on
    # token ids whose logprobs a prefill-only request reports (``meta["next_logprobs"]``), from the
    # logits at position ``logprob_start_len`` (with prompt logprobs) or at its last position:
    # scoring reads every choice's first token from the prompt's own logits
    score_next: list[int] | None = None
    next_logprobs: list[float] | None = None
    arrival_step: int = 0
    generator: torch.Generator | None = None
    matcher: Any = None
    constraint_engine: str | None = None
    # outputs
    out_logprobs: list[float] = field(default_factory=list)
    out_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[int, float]] = field(default_factory=list)
    text: str = ""  # decoded output text (before stop-string truncation)
    sent_len: int = 0  # characters of text already streamed
    sent_tokens: int = 0
    finish_reason: FinishReason | None = None
    matched_stop: str | int | None = None
    # per stop_regex pattern: where a match can still start (the text before it can never be part of
    # one); see engine_text._stop_regex_at. Empty until the first check of the current generation
    stop_regex_scan: list[int] = field(default_factory=list)
    stop_regex_floor: int = 0  # text held back by min_new_tokens: a match ending in it never stops
    stop_seen: int = 0  # text already searched for stops (forced text appended after a check is not)
    error: str | None = None
    retractions: int = 0
    # chains: several generations with constant text between them, run as one request
    # remaining steps after the current gen: ("text", str) | ("gen", params, matcher)
    chain: list[Any] | None = None
    chain_index: int = 0  # index of the current generation
    prompt_text: str | None = None  # the chain's prompt as text (rebase re-encodes prompt_text + chain_text)
    chain_text: str = ""  # text appended after the prompt by finished steps
    step_results: list[GenerateResult] = field(default_factory=list)
    # set by output processing: the scheduler re-points the KV to (prompt_ids, output_ids) after the step
    rebase_to: tuple[list[int], list[int]] | None = None
    num_forced: int = 0  # tokens appended by jump-forward
    forced_end: int = -1  # len(output_ids) where the last jump-forward text ended (-1: none yet)
    # speculation (``speculate``): the draft the next step verifies, set after each sampled token
    draft: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # draft tokens verified
    num_draft_accepted: int = 0  # of those, the ones that joined the output
    counted: bool = False  # its ending is in the engine's request counters (engine_counts.py)

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def kv_len(self) -> int:
        return len(self.kv_slots)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
