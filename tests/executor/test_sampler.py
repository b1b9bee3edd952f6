"""Tests of the sampler: order of operations, filters against HF warpers, seeds, masks, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from llmir_lang.kernels.reference import apply_token_bitmask
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmir_lang.errors import EngineError
from llmir_lang.executor.logit_processors import (
    apply_bitmask,
    apply_frequency_presence_penalty,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_k_top_p,
)
from llmir_lang.executor.sampler import Sampler, logprobs_of
from llmir_lang.executor.sampling_params import SamplingParams as SP

torch.set_num_threads(1)
NEG_INF = float("-inf")


def _logits(batch: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * scale


def _run(sampler: Sampler, logits: torch.Tensor, params: list[SP], **kw):
    b = len(params)
    return sampler.sample(
        logits,
        params,
        kw.pop("prompt_ids", [[] for _ in range(b)]),
        kw.pop("output_ids", [[] for _ in range(b)]),
        kw.pop("generators", [None] * b),
        **kw,
    )


def _bitmask_from_allowed(allowed: torch.Tensor) -> torch.Tensor:
    """[B, V] bool -> [B, ceil(V/32)] int32, the layout the constraint layer produces."""
    b, v = allowed.shape
    words = (v + 31) // 32
    padded = torch.zeros(b, words * 32, dtype=torch.int64)
    padded[:, :v] = allowed.long()
    packed = (padded.view(b, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


# --- greedy ----------------------------------------------------------------------------------


def test_greedy_is_argmax_and_ignores_padded_columns() -> None:
    vocab, padded = 50, 64
    logits = _logits(6, padded)
    logits[:, vocab:] = 100.0  # padding columns must never win
    out = _run(Sampler(vocab), logits, [SP() for _ in range(6)])
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits[:, :vocab].argmax(-1))
    assert out.logprobs is None and out.top_logprobs == [None] * 6


def test_greedy_bf16_does_not_modify_logits() -> None:
    logits = _logits(4, 40).to(torch.bfloat16)
    before = logits.clone()
    out = _run(Sampler(40), logits, [SP(repetition_penalty=1.5) for _ in range(4)], prompt_ids=[[1]] * 4)
    assert torch.equal(logits, before)
    assert out.token_ids.shape == (4,)


def test_plain_greedy_fast_path_agrees_with_the_general_path() -> None:
    vocab, padded = 50, 64
    logits = _logits(5, padded, seed=3)
    logits[:, vocab:] = 100.0
    logits[2, :vocab] = NEG_INF  # no allowed token: -1 on both paths
    plain = _run(Sampler(vocab), logits, [SP() for _ in range(5)])
    # an empty banned list and a logprob request send the same rows through the general path
    general = _run(Sampler(vocab), logits, [SP(return_logprob=True) for _ in range(5)])
    assert plain.logprobs is None and general.logprobs is not None
    assert torch.equal(plain.token_ids, general.token_ids)
    assert plain.token_ids[2] == -1
    banned = _run(Sampler(vocab), logits, [SP() for _ in range(5)], banned_ids=[[], [], [], [], []])
    assert torch.equal(banned.token_ids, plain.token_ids)


def test_empty_batch() -> None:
    out = _run(Sampler(10), torch.zeros(0, 10), [])
    assert out.token_ids.shape == (0,) and out.top_logprobs == []


# --- filters: support, per-row reference, HF warpers ------------------------------------------


def _draw_many(row: torch.Tensor, p: SP, n: int = 3000, vocab: int | None = None) -> set[int]:
    """Sample the same row n times in one batch and return the set of tokens seen."""
    vocab = vocab or row.shape[0]
    out = _run(Sampler(vocab, seed=1), row.unsqueeze(0).repeat(n, 1), [p] * n)
    return set(out.token_ids.tolist())


def test_top_k_restricts_support() -> None:
    row = _logits(1, 30, seed=2, scale=0.5)[0]
    seen = _draw_many(row, SP(temperature=1.0, top_k=4))
    assert seen == set(row.topk(4).indices.tolist())


def test_top_p_restricts_support() -> None:
    row = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    probs = row.softmax(-1)
    top_p = 0.8
    # smallest prefix of the sorted tokens whose mass reaches top_p
    keep = int((probs.cumsum(0) < top_p).sum()) + 1
    seen = _draw_many(row, SP(temperature=1.0, top_p=top_p))
    assert seen == set(range(keep))
    assert keep < 8


def test_min_p_restricts_support() -> None:
    row = torch.tensor([2.0, 1.9, 1.0, 0.5, -0.5, -3.0])
    probs = row.softmax(-1)
    min_p = 0.3
    expected = {i for i in range(6) if probs[i] >= min_p * probs.max()}
    seen = _draw_many(row, SP(temperature=1.0, min_p=min_p))
    assert seen == expected and len(expected) < 6


def _reference_filter(row: list[float], k: int, p: float, min_p: float) -> set[int]:
    """A straightforward per-row reference: the set of tokens that survive top-k, top-p, min-p."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    if 0 < k < len(row):
        kth = row[order[k - 1]]
        alive = [i for i in order if row[i] >= kth]
    else:
        alive = list(order)
    z = sum(math.exp(row[i]) for i in alive)
    kept, mass = [], 0.0
    for i in alive:
        kept.append(i)
        mass += math.exp(row[i]) / z
        if mass >= p:
            break
    z = sum(math.exp(row[i]) for i in kept)
    best = max(math.exp(row[i]) / z for i in kept)
    return {i for i in kept if math.exp(row[i]) / z >= min_p * best}


def test_filters_match_per_row_reference_with_mixed_params() -> None:
    x = _logits(8, 40, seed=3, scale=2.0)
    top_k = torch.tensor([-1, 1, 5, 40, 100, 10, 0, 3])
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.3, 0.95, 1.0, 0.7, 0.99])
    min_p = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.2, 0.05, 0.3, 0.0])
    got = apply_min_p(apply_top_k_top_p(x, top_k, top_p), min_p)
    for b in range(8):
        kept = set(torch.nonzero(got[b] > NEG_INF).flatten().tolist())
        ref = _reference_filter(x[b].double().tolist(), int(top_k[b]), float(top_p[b]), float(min_p[b]))
        assert kept == ref, f"row {b}"
        assert torch.equal(got[b][list(kept)], x[b][list(kept)])  # survivors keep their logits


@pytest.mark.parametrize("k", [1, 3, 17, 64])
def test_top_k_matches_hf(k: int) -> None:
    x = _logits(5, 64, seed=k)
    theirs = TopKLogitsWarper(top_k=k)(None, x.clone())
    assert torch.equal(apply_top_k_top_p(x, torch.full((5,), k), torch.ones(5)), theirs)
    assert torch.equal(apply_top_k(x, [k] * 5), theirs)


def test_top_k_alone_with_mixed_k_and_ties() -> None:
    x = _logits(5, 40, seed=8)
    x[2, :6] = 9.0  # a 6-way tie for first place: k=2 keeps all six (HF keeps ties too)
    ks = [-1, 3, 2, 40, 7]
    ours = apply_top_k(x, ks)
    assert torch.equal(ours, apply_top_k_top_p(x, torch.tensor(ks), torch.ones(5)))
    assert torch.equal((ours > NEG_INF).sum(-1), torch.tensor([40, 3, 6, 40, 7]))
    assert apply_top_k(x, [0] * 5) is x


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_hf(p: float) -> None:
    x = _logits(5, 64, seed=int(p * 1000))
    ours = apply_top_k_top_p(x, torch.full((5,), -1), torch.full((5,), p))
    assert torch.equal(ours, TopPLogitsWarper(top_p=p)(None, x.clone()))


def test_top_k_then_top_p_matches_hf_chain() -> None:
    x = _logits(5, 64, seed=11)
    ours = apply_top_k_top_p(x, torch.full((5,), 10), torch.full((5,), 0.6))
    theirs = TopPLogitsWarper(top_p=0.6)(None, TopKLogitsWarper(top_k=10)(None, x.clone()))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("m", [0.05, 0.2, 0.8])
def test_min_p_matches_hf(m: float) -> None:
    x = _logits(5, 64, seed=int(m * 100))
    assert torch.equal(apply_min_p(x, torch.full((5,), m)), MinPLogitsWarper(min_p=m)(None, x.clone()))


def test_repetition_penalty_matches_hf() -> None:
    x = _logits(3, 32, seed=5)
    seen = [[1, 4, 4, 9, 31], [0, 2], [5, 6, 7, 5, 5]]
    penalties = [1.3, 0.7, 2.0]
    ours = x.clone()
    apply_repetition_penalty(ours, [0, 1, 2], [torch.tensor(s) for s in seen], penalties)
    for b in range(3):
        proc = RepetitionPenaltyLogitsProcessor(penalty=penalties[b])
        theirs = proc(torch.tensor([seen[b]]), x[b : b + 1].clone())
        assert torch.allclose(ours[b], theirs[0], atol=0, rtol=1e-6)


def test_repetition_penalty_via_sample_uses_prompt_and_output() -> None:
    x = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    out = _run(
        Sampler(4), x, [SP(repetition_penalty=2.0, return_logprob=True)], prompt_ids=[[0]], output_ids=[[0]]
    )
    # token 0 is penalized once (2.0 -> 1.0), so token 1 wins
    assert out.token_ids.tolist() == [1]
    expected = torch.tensor([1.0, 1.9, -1.0, 0.5]).log_softmax(-1)[1]
    assert out.logprobs is not None and torch.allclose(out.logprobs[0], expected)


def test_frequency_presence_exact_values() -> None:
    x = torch.zeros(2, 6)
    apply_frequency_presence_penalty(x, [0, 1], [torch.tensor([1, 1, 1, 3]), [5]], [0.5, -1.0], [0.25, 2.0])
    assert x[0].tolist() == [0.0, -(3 * 0.5 + 0.25), 0.0, -(0.5 + 0.25), 0.0, 0.0]
    assert x[1].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, -(-1.0 + 2.0)]


def test_frequency_presence_through_sample_ignore_prompt() -> None:
    x = torch.tensor([[1.0, 0.9, 0.0, 0.0]])
    p = SP(frequency_penalty=0.1, presence_penalty=0.05, top_logprobs_num=4)
    out = _run(Sampler(4), x, [p], prompt_ids=[[1, 1, 1]], output_ids=[[0, 0]])
    processed = torch.tensor([1.0 - 0.2 - 0.05, 0.9, 0.0, 0.0])
    assert out.token_ids.tolist() == [1]
    lp = processed.log_softmax(-1)
    top = out.top_logprobs[0]
    assert top is not None and [t for t, _ in top][:2] == [1, 0] and {t for t, _ in top} == {0, 1, 2, 3}
    for t, v in top:
        assert math.isclose(v, float(lp[t]), abs_tol=1e-6)


def test_id_lists_may_be_arrays_or_tensors() -> None:
    import numpy as np

    x = _logits(3, 30, seed=12)
    ps = [SP(repetition_penalty=1.7, frequency_penalty=0.4, presence_penalty=0.3, return_logprob=True)] * 3
    prompts = [[1, 2, 2], [5], []]
    outputs = [[3, 3], [], [7, 8, 7]]
    banned = [[0], [], [29]]
    as_lists = _run(Sampler(30), x, ps, prompt_ids=prompts, output_ids=outputs, banned_ids=banned)
    as_arrays = _run(
        Sampler(30),
        x,
        ps,
        prompt_ids=[np.array(p, dtype=np.int32) for p in prompts],
        output_ids=[torch.tensor(o, dtype=torch.int64) for o in outputs],
        banned_ids=[np.array(b, dtype=np.int64) for b in banned],
    )
    assert torch.equal(as_lists.token_ids, as_arrays.token_ids)
    assert as_lists.logprobs is not None and as_arrays.logprobs is not None
    assert torch.equal(as_lists.logprobs, as_arrays.logprobs)


# --- masks -----------------------------------------------------------------------------------


def test_bitmask_matches_reference_and_is_never_sampled() -> None:
    vocab = 70
    allowed = torch.rand(4, vocab, generator=torch.Generator().manual_seed(0)) < 0.3
    allowed[:, 69] = True
    bitmask = _bitmask_from_allowed(allowed)
    x = _logits(4, vocab)
    ours, theirs = x.clone(), x.clone()
    apply_bitmask(ours, bitmask)
    apply_token_bitmask(theirs, bitmask)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours > NEG_INF, allowed)

    n = 500
    rows = x.repeat(n, 1)
    params = [SP(temperature=1.5) for _ in range(2 * n)] + [SP() for _ in range(2 * n)]
    out = _run(Sampler(vocab, seed=0), rows, params, bitmask=bitmask.repeat(n, 1))
    tok = out.token_ids
    assert bool(allowed.repeat(n, 1)[torch.arange(4 * n), tok].all())


def test_all_masked_row_gets_minus_one() -> None:
    vocab = 40
    allowed = torch.ones(3, vocab, dtype=torch.bool)
    allowed[1] = False
    params = [SP(temperature=1.0, return_logprob=True), SP(temperature=0.7, top_p=0.5), SP()]
    out = _run(Sampler(vocab), _logits(3, vocab), params, bitmask=_bitmask_from_allowed(allowed))
    assert out.token_ids[1].item() == -1
    assert out.token_ids[0].item() >= 0 and out.token_ids[2].item() >= 0
    assert out.logprobs is not None and out.logprobs[1].item() == NEG_INF
    assert math.isfinite(out.logprobs[0].item())
    # a greedy row fully masked by banned ids also ends with -1
    out = _run(Sampler(3), torch.zeros(1, 3), [SP()], banned_ids=[[0, 1, 2]])
    assert out.token_ids.tolist() == [-1]


def test_banned_ids_are_never_sampled() -> None:
    vocab = 12
    x = torch.zeros(1, vocab)
    x[0, 3] = 10.0  # the favourite, banned
    n = 400
    out = _run(
        Sampler(vocab, seed=3),
        x.repeat(n + 1, 1),
        [SP(temperature=1.0)] * n + [SP()],
        banned_ids=[[3, 4, 99, -5]] * (n + 1),  # out-of-range ids are ignored
    )
    assert not set(out.token_ids.tolist()) & {3, 4}
    assert out.token_ids[-1].item() not in (3, 4)


def test_padded_vocab_never_sampled() -> None:
    vocab, padded = 10, 16
    x = torch.zeros(1, padded)
    x[0, vocab:] = 50.0
    n = 500
    out = _run(Sampler(vocab, seed=0), x.repeat(n, 1), [SP(temperature=2.0)] * n)
    assert int(out.token_ids.max()) < vocab
    assert len(set(out.token_ids.tolist())) > 5


# --- seeds and distribution ------------------------------------------------------------------


def test_seeded_row_independent_of_batch_position_and_mates() -> None:
    vocab = 50
    row = _logits(1, vocab, seed=9, scale=1.0)
    mine = SP(temperature=0.8, top_p=0.9, seed=1234)

    def tokens_alone(steps: int = 15) -> list[int]:
        gen = Sampler.make_generator(1234, "cpu")
        return [_run(Sampler(vocab), row, [mine], generators=[gen]).token_ids.item() for _ in range(steps)]

    def tokens_in_batch(pos: int, steps: int = 15) -> list[int]:
        mates = [
            SP(temperature=1.0, top_k=3, repetition_penalty=1.2),
            SP(),
            SP(temperature=0.5, min_p=0.2, seed=7),
            SP(temperature=2.0, frequency_penalty=1.0),
        ]
        params = mates[:pos] + [mine] + mates[pos:]
        gens = [Sampler.make_generator(p.seed, "cpu") if p.seed is not None else None for p in params]
        logits = _logits(len(params), vocab, seed=pos + 100)
        logits[pos] = row[0]
        sampler = Sampler(vocab)
        seq = []
        for _ in range(steps):
            out = _run(sampler, logits, params, generators=gens, output_ids=[[1, 2]] * len(params))
            seq.append(out.token_ids[pos].item())
        return seq

    alone = tokens_alone()
    assert len(set(alone)) > 1  # the row really samples
    for pos in (0, 2, 4):
        assert tokens_in_batch(pos) == alone


def test_shared_generator_seed_is_reproducible() -> None:
    x = _logits(20, 30, scale=0.5)
    ps = [SP(temperature=1.0)] * 20
    a = _run(Sampler(30, seed=5), x, ps).token_ids
    b = _run(Sampler(30, seed=5), x, ps).token_ids
    assert torch.equal(a, b)


def test_sampling_frequencies_follow_tempered_softmax() -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    temp = 0.7
    n = 20000
    out = _run(Sampler(5, seed=0), row.repeat(n, 1), [SP(temperature=temp)] * n)
    freq = torch.bincount(out.token_ids, minlength=5).float() / n
    assert torch.allclose(freq, (row / temp).softmax(-1), atol=0.015)


def test_seeded_rows_follow_the_filtered_distribution() -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    n = 6000
    ps = [SP(temperature=1.0, top_k=4, seed=i) for i in range(n)]
    gens = [Sampler.make_generator(i, "cpu") for i in range(n)]
    out = _run(Sampler(6), row.repeat(n, 1), ps, generators=gens)
    freq = torch.bincount(out.token_ids, minlength=6).float() / n
    expected = torch.cat([row[:4].softmax(-1), torch.zeros(2)])
    assert torch.allclose(freq, expected, atol=0.025)


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_of_processed_logits_before_temperature() -> None:
    vocab = 20
    x = _logits(3, vocab, seed=4)
    allowed = torch.ones(3, vocab, dtype=torch.bool)
    allowed[:, :5] = False
    params = [
        SP(temperature=3.0, top_k=2, return_logprob=True, top_logprobs_num=3, repetition_penalty=1.5),
        SP(return_logprob=True),
        SP(temperature=0.5),  # asks for nothing
    ]
    prompt = [[7, 8], [], []]
    out = _run(Sampler(vocab, seed=0), x, params, prompt_ids=prompt, bitmask=_bitmask_from_allowed(allowed))
    processed = x.clone()
    for t in (7, 8):
        v = processed[0, t]
        processed[0, t] = v / 1.5 if v > 0 else v * 1.5
    processed[:, :5] = NEG_INF
    lp = processed.log_softmax(-1)
    assert out.logprobs is not None
    assert torch.allclose(out.logprobs, lp[torch.arange(3), out.token_ids], atol=1e-5)
    top = out.top_logprobs[0]
    assert top is not None and len(top) == 3
    ref_vals, ref_ids = lp[0].topk(3)
    assert [t for t, _ in top] == ref_ids.tolist()
    assert torch.allclose(torch.tensor([v for _, v in top]), ref_vals, atol=1e-5)
    assert out.top_logprobs[1] is None and out.top_logprobs[2] is None


def test_top_logprobs_leave_out_masked_tokens() -> None:
    allowed = torch.zeros(1, 10, dtype=torch.bool)
    allowed[0, [2, 6]] = True
    out = _run(Sampler(10), _logits(1, 10), [SP(top_logprobs_num=5)], bitmask=_bitmask_from_allowed(allowed))
    top = out.top_logprobs[0]
    assert top is not None and sorted(t for t, _ in top) == [2, 6]
    assert math.isclose(sum(math.exp(v) for _, v in top), 1.0, rel_tol=1e-5)


def test_logprobs_of_matches_log_softmax() -> None:
    x = _logits(7, 33).to(torch.bfloat16)
    ids = torch.randint(0, 33, (7,), generator=torch.Generator().manual_seed(1))
    got = logprobs_of(x, ids)
    assert got.dtype == torch.float32
    assert torch.allclose(got, x.float().log_softmax(-1)[torch.arange(7), ids], atol=1e-5)
    x3 = _logits(6, 33).view(2, 3, 33)
    ids3 = ids[:6].view(2, 3)
    assert torch.allclose(logprobs_of(x3, ids3), x3.log_softmax(-1).gather(-1, ids3[..., None])[..., 0])


# --- input errors ----------------------------------------------------------------------------


def test_bad_inputs_raise_engine_errors() -> None:
    s = Sampler(64)
    with pytest.raises(EngineError, match="columns"):
        _run(s, torch.zeros(1, 32), [SP()])
    with pytest.raises(EngineError, match="params has 2 rows"):
        s.sample(torch.zeros(1, 64), [SP(), SP()], [[]], [[]], [None])
    with pytest.raises(EngineError, match="banned_ids has 0 rows"):
        _run(s, torch.zeros(1, 64), [SP()], banned_ids=[])
    with pytest.raises(EngineError, match="bitmask"):
        _run(s, torch.zeros(1, 64), [SP()], bitmask=torch.zeros(1, 1, dtype=torch.int32))


def test_tiny_top_p_keeps_the_most_likely_token() -> None:
    # 1 - 1e-9 rounds to 1.0 in float32, so every cumulative mass passes the cut but the last token
    x = _logits(4, 50, seed=6)
    ours = apply_top_k_top_p(x, torch.full((4,), -1), torch.full((4,), 1e-9))
    kept = ours > NEG_INF
    assert torch.equal(kept.sum(-1), torch.ones(4, dtype=torch.int64))
    assert torch.equal(kept.float().argmax(-1), x.argmax(-1))
    out = _run(Sampler(50), x, [SP(temperature=1.0, top_p=1e-9)] * 4)
    assert torch.equal(out.token_ids, x.argmax(-1))


# --- audit fixes -------------------------------------------------------------------------------


def test_a_tiny_temperature_samples_the_argmax_not_nan() -> None:
    # x / 1e-45 overflowed float32 to inf, the softmax to NaN and the token to 0
    x = _logits(6, 50, seed=11, scale=5.0)
    x[:, 0] = -20.0  # token 0 is never the argmax here
    for temp in (1e-45, 1e-40, 1e-20, 1e-6):
        params = [SP(temperature=temp), SP(temperature=temp, seed=1)] * 3
        gens = [None, Sampler.make_generator(1)] * 3
        out = _run(Sampler(50, seed=0), x, params, generators=gens)
        assert torch.equal(out.token_ids, x.argmax(-1))


def test_a_verify_step_hands_back_the_draws_of_the_positions_it_threw_away() -> None:
    """Sampling positions t..t+k of one request in one call (a speculative verify step) draws the
    numbers k + 1 single steps draw; ``replay_draws`` leaves the generator where plain decoding
    would after the kept positions, so the next positions draw what plain decoding draws there."""
    vocab = 40
    x = _logits(5, vocab, seed=12, scale=1.0)
    p = SP(temperature=1.0, seed=77)
    sampler = Sampler(vocab)
    gen = Sampler.make_generator(77)
    one_by_one = [_run(sampler, x[i : i + 1], [p], generators=[gen]).token_ids.item() for i in range(5)]
    assert len(set(one_by_one)) > 1
    gen = Sampler.make_generator(77)
    before = gen.get_state()
    together = _run(sampler, x[:3], [p] * 3, generators=[gen] * 3).token_ids.tolist()
    assert together == one_by_one[:3]
    sampler.replay_draws(gen, before, 1)  # the verify step kept one token: positions 1, 2 again
    again = _run(sampler, x[1:5], [p] * 4, generators=[gen] * 4).token_ids.tolist()
    assert again == one_by_one[1:5]
    # without the replay the next positions would draw other numbers
    gen = Sampler.make_generator(77)
    _run(sampler, x[:3], [p] * 3, generators=[gen] * 3)
    assert _run(sampler, x[1:5], [p] * 4, generators=[gen] * 4).token_ids.tolist() != one_by_one[1:5]
