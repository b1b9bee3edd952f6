"""Turns a ScheduledBatch into a ForwardBatch, runs the model, and says which logits row is whose."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmir_lang.executor.attention import AttentionBackend, ForwardBatch, ForwardMode
from llmir_lang.executor.model import CausalLM
from llmir_lang.executor.scheduler import ScheduledBatch


@dataclass(slots=True)
class StepLogits:
    logits: torch.Tensor  # [rows, vocab] fp32
    sample_rows: list[int]  # per request in the batch: its sampling row, or -1
    prompt_rows: list[
        tuple[int, int, int]
    ]  # per request: (first row, first position, count) of prompt logprobs


class ModelRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, device: torch.device):
        self.model, self.backend, self.device = model, backend, device
        self.num_forward_calls = 0
        self.num_tokens_computed = 0

    def build(self, sb: ScheduledBatch) -> tuple[ForwardBatch, list[int], list[tuple[int, int, int]]]:
        ids: list[int] = []
        pos: list[int] = []
        loc: list[int] = []
        kv_indices: list[int] = []
        qo, kv = [0], [0]
        rows: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[int, int, int]] = []
        for req, prefix, n, sample in zip(sb.reqs, sb.prefix_lens, sb.extend_lens, sb.sample):
            fill = req.fill_ids
            base = len(ids)
            ids.extend(fill[prefix : prefix + n])
            pos.extend(range(prefix, prefix + n))
            loc.extend(req.kv_slots[prefix : prefix + n])
            kv_indices.extend(req.kv_slots[: prefix + n])
            qo.append(len(ids))
            kv.append(len(kv_indices))
            # prompt logprobs: position p scores prompt[p + 1]; collect the ones not yet collected
            first_row, first_pos, count = len(rows), -1, 0
            if req.logprob_start_len >= 0 and sb.mode is ForwardMode.EXTEND:
                want_from = req.logprob_start_len + len(req.prompt_logprobs)
                lo, hi = max(prefix, want_from), min(prefix + n, len(req.prompt_ids) - 1)
                if hi > lo:
                    rows.extend(base + (p - prefix) for p in range(lo, hi))
                    first_pos, count = lo, hi - lo
            prompt_rows.append((first_row, first_pos, count))
            if sample:
                sample_rows.append(len(rows))
                rows.append(base + n - 1)
            else:
                sample_rows.append(-1)
        dev = self.device

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=dev)

        fb = ForwardBatch(
            mode=sb.mode,
            input_ids=t(ids),
            positions=t(pos),
            out_cache_loc=t(loc),
            qo_indptr=t(qo),
            kv_indptr=t(kv),
            kv_indices=t(kv_indices),
            batch_size=len(sb.reqs),
            logits_indices=None if sb.mode is ForwardMode.DECODE else t(rows),
        )
        return fb, sample_rows, prompt_rows

    def run(self, sb: ScheduledBatch) -> StepLogits:
        fb, sample_rows, prompt_rows = self.build(sb)
        logits = self.model(fb, self.backend)
        self.num_forward_calls += 1
        self.num_tokens_computed += int(fb.input_ids.shape[0])
        return StepLogits(logits, sample_rows, prompt_rows)
