"""Host-side inputs of an extend step: a ScheduledBatch becomes a ForwardBatch.

An extend step computes, for each request, ``extend_lens[b]`` new tokens on top of
``prefix_lens[b]`` tokens of KV (prompt prefills, chunked prefill, forced text of jump-forward and
chains, and, in a mixed step, one token of each decoding request). Everything is gathered into a
few flat int lists and turned into tensors once (``int64_tensor``), so the host cost is one pass
over the requests' slot lists.
"""

from __future__ import annotations

import torch

from llmir_lang.executor.attention import ForwardBatch, ForwardMode
from llmir_lang.executor.cuda_graph import int64_tensor
from llmir_lang.executor.scheduler import ScheduledBatch


def build_extend_batch(
    sb: ScheduledBatch, device: torch.device
) -> tuple[ForwardBatch, list[int], list[tuple[int, int, int]]]:
    """The ForwardBatch of an extend step, each request's sampling row, and its prompt-logprob rows.

    Logits are computed only for the rows that need them (``logits_indices``): the last new token of
    each request that samples, and prompt positions whose logprobs were asked for and not yet
    collected. ``sample_rows[b]`` indexes request b's sampling row in those logits (-1: it does not
    sample); ``prompt_rows[b]`` is (first logits row, first prompt position, count). A speculative
    step (``sb.draft_lens``) samples request b at ``1 + draft_lens[b]`` consecutive rows from
    ``sample_rows[b]`` on.
    """
    ids: list[int] = []
    pos: list[int] = []
    loc: list[int] = []
    kv_indices: list[int] = []
    qo, kv = [0], [0]
    rows: list[int] = []
    sample_rows: list[int] = []
    prompt_rows: list[tuple[int, int, int]] = []
    drafts = sb.draft_lens or [0] * len(sb.reqs)
    for req, prefix, n, sample, d in zip(sb.reqs, sb.prefix_lens, sb.extend_lens, sb.sample, drafts):
        base = len(ids)
        end = prefix + n
        prompt, np_ = req.prompt_ids, len(req.prompt_ids)
        # the new tokens, without building prompt + output as one list; a speculative step's
        # draft tokens follow the output
        last = end - d
        if last <= np_:
            ids.extend(prompt[prefix:last])
        elif prefix >= np_:
            ids.extend(req.output_ids[prefix - np_ : last - np_])
        else:
            ids.extend(prompt[prefix:])
            ids.extend(req.output_ids[: last - np_])
        if d:
            ids.extend(req.draft[:d])
        pos.extend(range(prefix, end))
        slots = req.kv_slots
        loc.extend(slots[prefix:end])
        kv_indices.extend(slots[:end] if end < len(slots) else slots)
        qo.append(len(ids))
        kv.append(len(kv_indices))
        # prompt logprobs: position p scores prompt[p + 1]; collect the ones not yet collected
        first_row, first_pos, count = len(rows), -1, 0
        if req.logprob_start_len >= 0:
            want_from = req.logprob_start_len + len(req.prompt_logprobs)
            lo, hi = max(prefix, want_from), min(end, np_ - 1)
            if hi > lo:
                rows.extend(range(base + lo - prefix, base + hi - prefix))
                first_pos, count = lo, hi - lo
        prompt_rows.append((first_row, first_pos, count))
        if sample:
            sample_rows.append(len(rows))
            # a speculative row samples at its last token and after each draft token
            rows.extend(range(base + n - 1 - d, base + n))
        else:
            sample_rows.append(-1)

    def t(x: list[int]) -> torch.Tensor:
        return int64_tensor(x).to(device)

    fb = ForwardBatch(
        mode=ForwardMode.EXTEND,
        input_ids=t(ids),
        positions=t(pos),
        out_cache_loc=t(loc),
        qo_indptr=t(qo),
        kv_indptr=t(kv),
        kv_indices=t(kv_indices),
        batch_size=len(sb.reqs),
        logits_indices=t(rows),
    )
    return fb, sample_rows, prompt_rows
