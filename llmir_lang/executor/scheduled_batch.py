"""What the scheduler hands the model runner for one step: ``ScheduledBatch``."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmir_lang.executor.attention import ForwardMode
from llmir_lang.executor.request import Req


@dataclass(slots=True)
class ScheduledBatch:
    mode: ForwardMode
    reqs: list[Req]
    prefix_lens: list[int]  # KV tokens each request had before this step
    extend_lens: list[int]  # new tokens each request computes in this step
    sample: list[bool]  # whether the request samples a token after this step
    # mixed step (mode EXTEND): the last ``num_decode`` requests are running requests that decode
    # one token in the same forward as the extends before them; they stay in ``running``
    num_decode: int = 0
    # speculative decode step (mode EXTEND, every request a running one, ``num_decode`` == all):
    # request b computes its last token and ``draft_lens[b]`` draft tokens (``Req.draft``), and
    # samples at each of those positions; empty when no request drafts
    draft_lens: list[int] = field(default_factory=list)

    def only(self, i: int) -> ScheduledBatch:
        """The step of request ``i`` alone (its KV slots are already allocated): the engine reruns
        a failed step one request at a time. A decode row of a mixed or speculative step stays a
        decode row (``num_decode`` 1)."""
        decode_row = i >= len(self.reqs) - self.num_decode
        return ScheduledBatch(
            self.mode,
            [self.reqs[i]],
            [self.prefix_lens[i]],
            [self.extend_lens[i]],
            [self.sample[i]],
            num_decode=1 if decode_row else 0,
            draft_lens=[self.draft_lens[i]] if self.draft_lens else [],
        )
