"""The sampler: one call per engine step turns last-token logits into next tokens.

Order of operations for each row (the contract the tests check):

1. penalties: repetition (HF convention, over prompt + output tokens), then frequency / presence
   (OpenAI convention, over output tokens);
2. masks: ``banned_ids`` and the constraint ``bitmask`` set forbidden logits to ``-inf``;
3. reported logprobs: ``log_softmax`` of the logits after steps 1-2 (before temperature and the
   top-k / top-p / min-p filters), so they describe the model under its penalties and constraint;
4. greedy rows (``temperature`` below ``GREEDY_TEMPERATURE``, 1e-5: smaller ones overflow the
   division) take the argmax; the other rows are divided by their temperature, filtered by top-k,
   top-p, min-p, and sampled (seeded rows with their own generator).

A row whose every token is masked gets token id ``-1`` (and logprob ``-inf``); the sampler raises
nothing, so that the engine can end that one request with a constraint error and keep the batch.

Columns ``>= vocab_size`` (padding of the model's output layer) are dropped before anything else and
can never be sampled. Work is vectorized across rows; the only per-row Python loops gather the
parameters, the penalty token lists, and the draws of seeded rows (a seeded row's draw must depend on
its own logits and generator only, never on its batch mates; ``replay_draws`` hands back the draws of
positions a speculative verify step sampled and threw away).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmir_lang import kernels
from llmir_lang.errors import EngineError
from llmir_lang.executor.logit_processors import (
    _NEG_INF,
    TokenIds,
    _flat_pairs,
    apply_bitmask,
    apply_frequency_presence_penalty,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_k_top_p,
    to_device,
)
from llmir_lang.executor.sampling_params import GREEDY_TEMPERATURE, SamplingParams

_MAX_TEMPERATURE = 1e30  # larger temperatures sample as this one does (see _sample_rows)


@dataclass(slots=True)
class SampleOutput:
    """What one sampling step returns: on the CPU, or on the logits' device with ``on_device``.

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

    ``vocab_size``: the ids that may be sampled (the engine passes the model's ``vocab_size``);
    logits may have more columns (a padded output layer). The sampler keeps one shared generator
    for rows without a seed; ``seed`` fixes it (the engine passes ``Engine(seed=...)``), None draws
    a fresh nondeterministic seed.
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

    def replay_draws(self, gen: torch.Generator, state: torch.Tensor, rows: int) -> None:
        """Set ``gen`` to ``state`` and advance it by the draws of ``rows`` sampled rows, exactly as
        ``sample`` consumes it (one Exp(1) fill of ``vocab_size`` float32 values per row).

        A speculative verify step samples every draft position of a seeded request from its
        generator and keeps only those up to the first mismatch; the draws of the positions it threw
        away must not be used up, or the next positions' numbers differ from plain decoding's (and
        the same seed gave other text alone, speculated, than in a batch too large to draft for).
        With the state from before the verify step and the kept positions, the generator is where
        plain decoding leaves it."""
        gen.set_state(state)
        scratch = torch.empty(self.vocab_size, dtype=torch.float32, device=gen.device)
        for _ in range(rows):
            scratch.exponential_(generator=gen)

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
        on_device: bool = False,
    ) -> SampleOutput:
        """Sample one token per row of ``logits [B, V']`` (see the module docstring for the order).

        ``logits`` is never modified. ``bitmask`` is int32 ``[B, ceil(vocab_size / 32)]`` (a set bit
        allows the token). ``banned_ids`` ids outside ``[0, vocab_size)`` are ignored, as are penalty
        token ids outside that range (they can never be sampled). The id lists may be lists, numpy
        arrays or 1-D tensors; with a repetition penalty the prompt is re-read every step, so an
        engine with long prompts should keep each prompt as an array made once (about 3x cheaper
        per step than a Python list, measured).

        ``on_device``: leave ``token_ids`` and ``logprobs`` on the logits' device, so the caller can
        copy them to the host asynchronously (the engine's run-ahead decode); no row may ask for
        top logprobs then, since those are built as host lists.
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
                # On CUDA a row reduction over a 128k vocabulary runs one program per row (40 us at
                # batch 64 on an H100); kernels.greedy_tokens spreads each row over the SMs.
                if logits.is_cuda:
                    tokens = kernels.greedy_tokens(logits, vocab)
                else:
                    max_vals, tokens = logits[:, :vocab].max(dim=-1)
                    tokens = tokens.masked_fill(max_vals == _NEG_INF, -1)
                return SampleOutput(_placed(tokens, on_device), None, [None] * batch)
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
        sample_rows = [i for i, t in enumerate(temps) if t >= GREEDY_TEMPERATURE]
        if sample_rows:
            tokens = tokens.clone()
            tokens[to_device(sample_rows, torch.int64, x.device)] = self._sample_rows(
                x, sample_rows, all_masked, params, generators
            )
        tokens = tokens.masked_fill(all_masked, -1)

        if on_device and any(p.top_logprobs_num for p in params):
            raise EngineError("Sampler.sample(on_device=True) cannot report top logprobs")
        logprobs, top = _report_logprobs(x, tokens, all_masked, params, on_device)
        return SampleOutput(_placed(tokens, on_device), logprobs, top)

    def _sample_rows(
        self,
        x: torch.Tensor,
        rows: list[int],
        all_masked: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Draw one token for each of ``rows`` (not greedy); returns ``[len(rows)]`` int64. Rows
        that share one generator (a verify step's positions) draw from it in row order, as the same
        rows sampled one step at a time would."""
        device = x.device
        rows_t = to_device(rows, torch.int64, device)
        # NOTE: above about 3.4e38 a temperature is inf in float32, and -inf / inf (a masked
        # logit) is NaN, which made every such row sample token 0, masked or not; 1e30 already
        # flattens any finite logit to 0 (a uniform draw over the allowed tokens)
        temp = to_device([min(params[i].temperature, _MAX_TEMPERATURE) for i in rows], torch.float32, device)
        xs = x[rows_t].float() / temp.unsqueeze(1)
        # An all-masked row would make softmax NaN; its token becomes -1 later.
        xs = xs.masked_fill(all_masked[rows_t].unsqueeze(1), 0.0)

        top_k = [params[i].top_k for i in rows]
        top_p = [params[i].top_p for i in rows]
        if any(p < 1.0 for p in top_p):
            xs = apply_top_k_top_p(
                xs,
                to_device(top_k, torch.int64, device),
                to_device(top_p, torch.float32, device),
            )
        elif any(0 < k < xs.shape[1] for k in top_k):
            # No top-p in this batch: a partial top-k is much cheaper than a full sort.
            xs = apply_top_k(xs, top_k)
        min_p = [params[i].min_p for i in rows]
        if any(m > 0.0 for m in min_p):
            xs = apply_min_p(xs, to_device(min_p, torch.float32, device))
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
            idx = to_device(shared, torch.int64, device)
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
            noise[j].exponential_(generator=gen)  # what replay_draws repeats
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


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., token_ids]`` in float32: logits ``[..., V]``, token_ids ``[...]``.

    Used for prompt logprobs and scoring; never materializes the full log_softmax.
    """
    lf = logits.float()
    picked = lf.gather(-1, token_ids.to(device=lf.device, dtype=torch.int64).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(lf, dim=-1)


# --- helpers ---------------------------------------------------------------------------------


def _placed(tokens: torch.Tensor, on_device: bool) -> torch.Tensor:
    """int64 token ids on the host, or left where they are (``on_device``)."""
    return tokens.to(torch.int64) if on_device else tokens.to("cpu", torch.int64)


def _report_logprobs(
    x: torch.Tensor,
    tokens: torch.Tensor,
    all_masked: torch.Tensor,
    params: Sequence[SamplingParams],
    on_device: bool = False,
) -> tuple[torch.Tensor | None, list[list[tuple[int, float]] | None]]:
    top_n = [p.top_logprobs_num for p in params]
    if not any(p.return_logprob for p in params) and not any(top_n):
        return None, [None] * len(params)
    x = x.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, tokens.clamp(min=0).unsqueeze(1)).squeeze(1) - lse
    logprobs = picked.masked_fill(all_masked, _NEG_INF).to(torch.float32)
    if not on_device:
        logprobs = logprobs.cpu()
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
        p.temperature < GREEDY_TEMPERATURE
        and p.repetition_penalty == 1.0
        and p.frequency_penalty == 0.0
        and p.presence_penalty == 0.0
        and not p.return_logprob
        and not p.top_logprobs_num
    )
