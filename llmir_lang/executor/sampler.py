"""The sampler: one call per engine step turns last-token logits into next tokens.

Order of operations for each row (the contract the tests check):

1. penalties: repetition (HF convention, over prompt + output tokens), then frequency / presence
   (OpenAI convention, over output tokens);
2. masks: ``banned_ids`` and the constraint ``bitmask`` set forbidden logits to ``-inf``;
3. reported logprobs: ``log_softmax`` of the logits after steps 1-2 (before temperature and the
   top-k / top-p / min-p filters), so they describe the model under its penalties and constraint;
4. greedy rows (``temperature == 0``) take the argmax; the other rows are divided by their
   temperature, filtered by top-k, top-p, min-p, and sampled (seeded rows with their own generator).

A row whose every token is masked gets token id ``-1`` (and logprob ``-inf``); the sampler raises
nothing, so that the engine can end that one request with a constraint error and keep the batch.

Columns ``>= vocab_size`` (padding of the model's output layer) are dropped before anything else and
can never be sampled. Work is vectorized across rows; the only per-row Python loops gather the
parameters, the penalty token lists, and the draws of seeded rows (a seeded row's draw must depend on
its own logits and generator only, never on its batch mates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmir_lang.errors import EngineError
from llmir_lang.executor.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# Token ids of one row: a list of ints, a numpy array or a 1-D int tensor (passed through cheaply).
TokenIds = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(slots=True)
class SampleOutput:
    """What one sampling step returns, on the CPU.

    ``token_ids[b] == -1`` means row b had no allowed token (every logit masked).
    ``logprobs`` is None unless some row asked for logprobs (``return_logprob`` or
    ``top_logprobs_num > 0``); when present it has a value for every row.
    ``top_logprobs[b]`` is None unless row b asked for ``top_logprobs_num > 0``; it lists up to that
    many ``(token id, logprob)`` pairs, best first, leaving out masked tokens.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Samples next tokens for a batch of rows with per-row ``SamplingParams``.

    ``vocab_size`` is the tokenizer's vocabulary; logits may have more columns (padded vocab).
    The sampler keeps one shared generator for rows without a seed; ``seed`` fixes it (tests),
    None draws a fresh nondeterministic seed.
    """

    def __init__(self, vocab_size: int, device: torch.device | str = "cpu", seed: int | None = None):
        if vocab_size <= 0:
            raise EngineError(f"Sampler needs vocab_size > 0, got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._seed = seed
        # Keyed by device so that logits on "cuda:0" work even if the sampler was made with "cuda".
        self._shared: dict[torch.device, torch.Generator] = {}

    @staticmethod
    def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator for one seeded request; pass the same one to every step of that request."""
        gen = torch.Generator(device=torch.device(device))
        gen.manual_seed(seed)
        return gen

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._shared[device] = gen
        return gen

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[TokenIds],
        output_ids: Sequence[TokenIds],
        generators: Sequence[torch.Generator | None],
        bitmask: torch.Tensor | None = None,
        banned_ids: Sequence[TokenIds] | None = None,
    ) -> SampleOutput:
        """Sample one token per row of ``logits [B, V']`` (see the module docstring for the order).

        ``logits`` is never modified. ``bitmask`` is int32 ``[B, ceil(vocab_size / 32)]`` (a set bit
        allows the token). ``banned_ids`` ids outside ``[0, vocab_size)`` are ignored, as are penalty
        token ids outside that range (they can never be sampled). The id lists may be lists, numpy
        arrays or 1-D tensors; with a repetition penalty the prompt is re-read every step, so an
        engine with long prompts should keep each prompt as an array made once (about 3x cheaper
        per step than a Python list, measured).
        """
        rows = {
            "params": params,
            "prompt_ids": prompt_ids,
            "output_ids": output_ids,
            "generators": generators,
        }
        batch = self._check_inputs(
            logits, rows | ({"banned_ids": banned_ids} if banned_ids is not None else {}), bitmask
        )
        if batch == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return SampleOutput(empty, None, [])
        vocab = self.vocab_size
        if bitmask is None and all(_plain_greedy(p) for p in params):
            if banned_ids is None or not any(len(b) for b in banned_ids):
                # The common decode step: no logit is masked or changed and nothing is reported, so
                # the token is the argmax (in the model's dtype, no copy) and one copy to the host.
                max_vals, tokens = logits[:, :vocab].max(dim=-1)
                tokens = tokens.masked_fill(max_vals == _NEG_INF, -1)
                return SampleOutput(tokens.to("cpu", torch.int64), None, [None] * batch)
        temps = [p.temperature for p in params]
        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        freq_rows = [
            i
            for i, p in enumerate(params)
            if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and len(output_ids[i]) > 0
        ]
        banned_rows = [i for i in range(batch) if banned_ids is not None and len(banned_ids[i]) > 0]
        mutates = bool(rep_rows or freq_rows or banned_rows or bitmask is not None)

        x = logits[:, :vocab]
        if mutates:
            # Copy only when a step below writes in place: the caller's logits stay untouched.
            # Otherwise keep the model's dtype (argmax in bf16 picks the same token, no copy).
            x = x.to(torch.float32, copy=True)
        if rep_rows:
            # A row listed twice (prompt ids, then output ids) has its two lists merged.
            penalties = [params[i].repetition_penalty for i in rep_rows]
            apply_repetition_penalty(
                x,
                rep_rows + rep_rows,
                [prompt_ids[i] for i in rep_rows] + [output_ids[i] for i in rep_rows],
                penalties + penalties,
            )
        if freq_rows:
            apply_frequency_presence_penalty(
                x,
                freq_rows,
                [output_ids[i] for i in freq_rows],
                [params[i].frequency_penalty for i in freq_rows],
                [params[i].presence_penalty for i in freq_rows],
            )
        if banned_rows:
            assert banned_ids is not None
            r, t = _flat_pairs(banned_rows, [banned_ids[i] for i in banned_rows], vocab, x.device)
            x[r, t] = _NEG_INF
        if bitmask is not None:
            apply_bitmask(x, bitmask)

        # One pass gives both the greedy choice and the all-masked test (max == -inf).
        max_vals, tokens = x.max(dim=-1)
        all_masked = max_vals == _NEG_INF
        sample_rows = [i for i, t in enumerate(temps) if t > 0.0]
        if sample_rows:
            tokens = tokens.clone()
            tokens[torch.tensor(sample_rows, device=x.device)] = self._sample_rows(
                x, sample_rows, all_masked, params, generators
            )
        tokens = tokens.masked_fill(all_masked, -1)

        logprobs, top = _report_logprobs(x, tokens, all_masked, params)
        return SampleOutput(tokens.to("cpu", torch.int64), logprobs, top)

    def _sample_rows(
        self,
        x: torch.Tensor,
        rows: list[int],
        all_masked: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Draw one token for each of ``rows`` (temperature > 0); returns ``[len(rows)]`` int64."""
        device = x.device
        rows_t = torch.tensor(rows, device=device)
        temp = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32, device=device)
        xs = x[rows_t].float() / temp.unsqueeze(1)
        # An all-masked row would make softmax NaN; its token becomes -1 later.
        xs = xs.masked_fill(all_masked[rows_t].unsqueeze(1), 0.0)

        top_k = [params[i].top_k for i in rows]
        top_p = [params[i].top_p for i in rows]
        if any(p < 1.0 for p in top_p):
            xs = apply_top_k_top_p(
                xs,
                torch.tensor(top_k, dtype=torch.int64, device=device),
                torch.tensor(top_p, dtype=torch.float32, device=device),
            )
        elif any(0 < k < xs.shape[1] for k in top_k):
            # No top-p in this batch: a partial top-k is much cheaper than a full sort.
            xs = apply_top_k(xs, top_k)
        min_p = [params[i].min_p for i in rows]
        if any(m > 0.0 for m in min_p):
            xs = apply_min_p(xs, torch.tensor(min_p, dtype=torch.float32, device=device))
        probs = torch.softmax(xs, dim=-1)

        # Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. draws token i with probability
        # p_i (torch.multinomial's own one-sample path). Seeded rows fill their noise row from
        # their own generator, so their draw never depends on batch mates; shared rows take one
        # batched fill. Per seeded row this is one kernel, against several (and checks) for
        # multinomial.
        noise = torch.empty_like(probs)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        shared_gen = self._shared_generator(device) if shared else None
        if len(shared) == len(rows):
            noise.exponential_(generator=shared_gen)
        elif shared:
            idx = torch.tensor(shared, device=device)
            noise[idx] = torch.empty(len(shared), probs.shape[1], device=device).exponential_(
                generator=shared_gen
            )
        for j, i in enumerate(rows):
            gen = generators[i]
            if gen is None:
                continue
            if gen.device.type != device.type:
                raise EngineError(
                    f"row {i}: its generator is on {gen.device} but the logits are on {device}; "
                    f"make it with Sampler.make_generator(seed, device={str(device)!r})"
                )
            noise[j].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)

    def _check_inputs(
        self, logits: torch.Tensor, rows: dict[str, Sequence[object]], bitmask: torch.Tensor | None
    ) -> int:
        """Checks shapes; ``rows`` maps each per-row argument's name to its value."""
        if logits.dim() != 2:
            raise EngineError(f"Sampler.sample needs logits of shape [B, V], got {tuple(logits.shape)}")
        batch, width = logits.shape
        if width < self.vocab_size:
            raise EngineError(
                f"logits have {width} columns but the vocabulary has {self.vocab_size} tokens; "
                "build the Sampler with the tokenizer's vocab size, at most the model's output width"
            )
        for name, seq in rows.items():
            if len(seq) != batch:
                raise EngineError(f"Sampler.sample: {name} has {len(seq)} rows but logits have {batch}")
        words = (self.vocab_size + 31) // 32
        if bitmask is not None and (
            bitmask.dim() != 2 or bitmask.shape[0] != batch or bitmask.shape[1] < words
        ):
            raise EngineError(
                f"bitmask must be int32 [{batch}, {words}] (one bit per vocab token), got {tuple(bitmask.shape)}"
            )
        return batch


# --- logit processors: in place on float32 [B, V] unless stated ------------------------------


def apply_repetition_penalty(
    x: torch.Tensor, rows: Sequence[int], token_ids: Sequence[TokenIds], penalties: Sequence[float]
) -> None:
    """HF convention, in place: for each distinct token seen in row ``rows[j]``, a positive logit is
    divided by ``penalties[j]`` and a negative one multiplied by it (once, however often it occurs).
    A row may be listed more than once (same penalty each time): its id lists are merged."""
    r, t = _flat_pairs(rows, token_ids, x.shape[1], x.device)
    if t.numel() == 0:
        return
    pen = _per_row(rows, penalties, x.shape[0], x.device)[r]
    # NOTE: a token seen twice appears twice in (r, t); every copy writes the same value, computed
    # from the logit before any write, so it is penalized once without a (sorting) unique.
    vals = x[r, t]
    x[r, t] = torch.where(vals < 0, vals * pen, vals / pen)


def apply_frequency_presence_penalty(
    x: torch.Tensor,
    rows: Sequence[int],
    output_ids: Sequence[TokenIds],
    frequency: Sequence[float],
    presence: Sequence[float],
) -> None:
    """OpenAI convention, in place: ``logit[t] -= count[t] * frequency + (count[t] > 0) * presence``
    where ``count`` counts token t among the row's generated tokens. Rows must be distinct."""
    r, t = _flat_pairs(rows, output_ids, x.shape[1], x.device)
    if t.numel() == 0:
        return
    freq = _per_row(rows, frequency, x.shape[0], x.device)[r]
    pres = _per_row(rows, presence, x.shape[0], x.device)[r]
    # Presence first: duplicate pairs all write the same value (taken before any write), so it
    # is subtracted once. Then frequency accumulates once per occurrence. No unique / sort needed.
    x[r, t] = x[r, t] - pres
    x.index_put_((r, t), -freq, accumulate=True)


def apply_bitmask(x: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: ``x[b, v] = -inf`` where bit ``v % 32`` of ``bitmask[b, v // 32]`` is 0 (the
    semantics of ``kernels.reference.apply_token_bitmask``); extra words past ``V`` are ignored."""
    batch, vocab = x.shape
    bits = torch.arange(32, device=x.device, dtype=torch.int32)
    words = bitmask.to(device=x.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().reshape(batch, -1)[:, :vocab]
    x.masked_fill_(~allowed, _NEG_INF)


def apply_top_k(x: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """Per-row top-k alone (same result as ``apply_top_k_top_p`` with ``top_p = 1``): keeps every
    logit >= the row's k-th largest; ``k <= 0`` or ``k >= V`` keeps all. Returns a new tensor."""
    vocab = x.shape[1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    cut = [k for k in ks if k < vocab]
    if not cut:
        return x
    # One partial topk with the batch's largest k serves every row; rows without a cut get -inf.
    kmax = max(cut)
    vals = torch.topk(x, kmax, dim=-1).values
    k = torch.tensor([min(k, kmax) for k in ks], dtype=torch.int64, device=x.device)
    kth = vals.gather(1, (k - 1).unsqueeze(1))
    no_cut = torch.tensor([k >= vocab for k in ks], dtype=torch.bool, device=x.device)
    kth = kth.masked_fill(no_cut.unsqueeze(1), _NEG_INF)
    return x.masked_fill(x < kth, _NEG_INF)


def apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row top-k then top-p on ``x [B, V]``; returns a new tensor with removed logits at -inf.

    top-k keeps every logit >= the k-th largest (ties kept; ``k <= 0`` or ``k >= V`` keeps all).
    top-p keeps the smallest set of most likely tokens whose mass (after top-k) reaches ``top_p``,
    always at least one token. Both match the HF warpers applied in that order.
    """
    vocab = x.shape[1]
    # Ascending order: the top-k threshold is at column V - k and the top-p test is a cumsum.
    sorted_x, order = torch.sort(x, dim=-1)
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    kth = sorted_x.gather(1, (vocab - k).unsqueeze(1))
    sorted_x = sorted_x.masked_fill(sorted_x < kth, _NEG_INF)
    cum = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1)
    remove = cum <= (1.0 - top_p).unsqueeze(1)
    remove[:, -1] = False
    return x.masked_fill(remove.scatter(1, order, remove), _NEG_INF)


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p * (max probability)`` of their row (the most
    likely token always stays); returns a new tensor."""
    probs = torch.softmax(x, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return x.masked_fill(probs < threshold, _NEG_INF)


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., token_ids]`` in float32: logits ``[..., V]``, token_ids ``[...]``.

    Used for prompt logprobs and scoring; never materializes the full log_softmax.
    """
    lf = logits.float()
    picked = lf.gather(-1, token_ids.to(device=lf.device, dtype=torch.int64).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(lf, dim=-1)


# --- helpers ---------------------------------------------------------------------------------


def _report_logprobs(
    x: torch.Tensor, tokens: torch.Tensor, all_masked: torch.Tensor, params: Sequence[SamplingParams]
) -> tuple[torch.Tensor | None, list[list[tuple[int, float]] | None]]:
    top_n = [p.top_logprobs_num for p in params]
    if not any(p.return_logprob for p in params) and not any(top_n):
        return None, [None] * len(params)
    x = x.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, tokens.clamp(min=0).unsqueeze(1)).squeeze(1) - lse
    logprobs = picked.masked_fill(all_masked, _NEG_INF).to("cpu", torch.float32)
    top: list[list[tuple[int, float]] | None] = [None] * len(params)
    k = min(max(top_n), x.shape[1])
    if k > 0:
        vals, ids = torch.topk(x, k, dim=-1)
        lps = (vals - lse.unsqueeze(1)).cpu().tolist()
        ids_list = ids.cpu().tolist()
        for b, n in enumerate(top_n):
            if n > 0:
                top[b] = [(ids_list[b][j], lps[b][j]) for j in range(min(n, k)) if lps[b][j] != _NEG_INF]
    return logprobs, top


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy with no penalty and no logprobs: the row's token is its plain argmax."""
    return (
        p.temperature == 0.0
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and not p.return_logprob
        and not p.top_logprobs_num
    )


def _flat_pairs(
    rows: Sequence[int], token_ids: Sequence[TokenIds], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row id lists into (row, token) index tensors, dropping ids outside [0, vocab)."""
    # numpy turns Python int lists into an array several times faster than torch.as_tensor does,
    # which matters for long prompts under a repetition penalty; tensors pass through as they are.
    parts = [
        ids.detach().to("cpu", torch.int64).reshape(-1).numpy()
        if isinstance(ids, torch.Tensor)
        else np.asarray(ids, dtype=np.int64).reshape(-1)
        for ids in token_ids
    ]
    t = torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, dtype=torch.int64)
    r = torch.repeat_interleave(
        torch.tensor(list(rows), dtype=torch.int64), torch.tensor([p.shape[0] for p in parts])
    )
    keep = (t >= 0) & (t < vocab)
    return r[keep].to(device), t[keep].to(device)


def _per_row(rows: Sequence[int], values: Sequence[float], batch: int, device: torch.device) -> torch.Tensor:
    """A [batch] float32 tensor holding ``values[j]`` at ``rows[j]`` (zero elsewhere)."""
    out = torch.zeros(batch, dtype=torch.float32)
    out[torch.tensor(list(rows), dtype=torch.int64)] = torch.tensor(list(values), dtype=torch.float32)
    return out.to(device)
