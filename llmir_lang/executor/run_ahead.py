"""Run-ahead decode: step N+1 is launched before the host has seen step N's tokens.

On CUDA the forward and the sampling of a decode step are only queued; the host then waits for
the tokens and spends about as long again appending them, checking stops, scheduling and building
the next step's inputs, while the GPU idles. With run-ahead the next decode step of the same
requests is queued first, its input ids read on the device from this step's sampled tokens, and
the host does its per-token work while that step computes. The GPU then waits on the host only
where the host work outgrows a step.

A request runs ahead only where nothing the host decides from a token changes the next step's
inputs or sampling: no constraint (its mask needs the token), no penalties (they read the output
ids), no banned ids at the next position (``min_new_tokens``), no top logprobs (host lists), no
jump-forward or chain rebase, no speculative draft. A request that cannot be going on after this
step (``max_new_tokens`` or the context length) is left out of the next step. One that stops on a
token or a stop string computes one step more than it needs: that step's KV is the KV of its last
token (valid, and cached with it) and its sampled token is dropped.

Invariants, for the requests of the step in flight (``Ahead``) between two engine steps: their
output holds every token up to the step before it, and ``kv_len == seq_len`` (the step in flight
computes the KV of the last token), one more than a request has between ordinary steps. All later
work on those slots is queued on the same stream, after the step in flight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.engine_output import _chain_continues
from llmir_lang.executor.model_runner import StepLogits
from llmir_lang.executor.request import Req
from llmir_lang.executor.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from llmir_lang.executor.engine_output import OutputProcessor

RUN_AHEAD_ENV = "LLMIR_RUN_AHEAD"


def run_ahead_default(device_type: str) -> bool:
    """On for CUDA, off on the CPU (its forward is synchronous: nothing to overlap with).

    Measured on one H100 (``benchmarks/gpu/bench_engine_gpu.py``, 2026-11-23, ``_s5``): the
    64-request shared-prefix batch took 0.344 s with it against 0.403 s without on the Llama-3.2-1B
    shape (1.17x) and 1.16 s against 1.23 s on the Llama-3-8B shape (1.06x), with the same tokens.
    ``Engine(run_ahead=...)`` or ``LLMIR_RUN_AHEAD=1`` / ``=0`` overrides it."""
    forced = os.environ.get(RUN_AHEAD_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return device_type == "cuda"


@dataclass(slots=True)
class Ahead:
    """A decode step whose forward and sampling are queued and whose tokens the host has not read."""

    batch: ScheduledBatch
    tokens: torch.Tensor  # [n] int64 on the device: the next step's input ids
    host_tokens: torch.Tensor  # [n] int64 on the host, filled by an async copy
    host_logprobs: torch.Tensor | None
    ready: torch.cuda.Event | None  # recorded after the copies (None on the CPU)


def eligible(out: OutputProcessor, req: Req, ahead: int) -> bool:
    """Whether ``req``'s token ``ahead`` positions past its output can be sampled before the host
    knows the tokens in between (see the module docstring)."""
    p = req.params
    return (
        req.matcher is None
        and req.rebase_to is None
        and not req.draft
        and not _chain_continues(req)
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and not p.top_logprobs_num
        and not out._banned(req, ahead)
    )


def goes_on(req: Req, context_len: int) -> bool:
    """Whether ``req`` may still be running after the step in flight appends its token (it is
    certainly done at ``max_new_tokens`` or the context length; a stop token may still end it)."""
    return (
        not req.finished
        and len(req.output_ids) + 2 <= req.params.max_new_tokens
        and req.seq_len + 1 < context_len
    )


def launch(out: OutputProcessor, batch: ScheduledBatch, step: StepLogits) -> Ahead:
    """Sample every row of a decode step on the device and start copying the tokens to the host."""
    assert batch.mode is ForwardMode.DECODE
    reqs = batch.reqs
    sampled = out.engine.sampler.sample(
        step.logits,
        [r.params for r in reqs],
        [r.prompt_ids for r in reqs],
        [r.output_ids for r in reqs],
        [r.generator for r in reqs],
        on_device=True,
    )
    tokens = sampled.token_ids
    if tokens.device.type != "cuda":
        return Ahead(batch, tokens, tokens, sampled.logprobs, None)
    host = torch.empty(tokens.shape, dtype=torch.int64, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    host_lp = None
    if sampled.logprobs is not None:
        host_lp = torch.empty(tokens.shape, dtype=torch.float32, pin_memory=True)
        host_lp.copy_(sampled.logprobs, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return Ahead(batch, tokens, host, host_lp, ready)


def complete(out: OutputProcessor, ahead: Ahead) -> None:
    """Wait for the step's tokens and append them (requests that ended meanwhile drop theirs)."""
    if ahead.ready is not None:
        ahead.ready.synchronize()
    tokens = ahead.host_tokens.tolist()
    lps = ahead.host_logprobs.tolist() if ahead.host_logprobs is not None else [None] * len(tokens)
    for req, tok, lp in zip(ahead.batch.reqs, tokens, lps):
        if not req.finished:
            out.append_isolated(req, tok, lp, None)
