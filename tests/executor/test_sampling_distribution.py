"""Statistical oracle for what the sampler draws: temperature, top-k, top-p, min-p (alone, combined,
at their edge values, with ties at the cutoffs) and constraint masks, on a tiny random model.

The oracle (``expected_probs``) is written from the definitions, in float64, in the order the
sampler documents and Hugging Face ``transformers`` uses (constraint / banned ids, temperature,
top-k, top-p over the renormalized distribution, min-p relative to the most likely token);
``test_oracle_is_the_transformers_warper_chain`` checks it against transformers' own warpers. Every
draw is seeded, so each test is deterministic; the chi-square bound is the 1 - 1e-7 quantile (a
correct sampler passes it with a wide margin, a wrong order of operations fails it by far).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from llmir_lang.executor.constraints import spec_from_regex
from llmir_lang.executor.sampler import Sampler
from llmir_lang.executor.sampling_params import SamplingParams as SP

NEG_INF = float("-inf")
PROMPT = [5, 17, 42, 99, 7]
# LLMIR_SAMPLING_DEVICE=cuda: the same draws on the GPU sampler's paths (fp32 engine)
DEVICE = os.environ.get("LLMIR_SAMPLING_DEVICE", "cpu")


# --- the oracle ----------------------------------------------------------------------------------


def expected_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    min_p: float = 0.0,
    allowed: torch.Tensor | None = None,
    margin: float = 1e-4,
) -> torch.Tensor:
    """The distribution the parameters define, float64 ``[V]``. Ties at a cutoff are all kept.
    Raises when a cutoff lies within ``margin`` of a decision (float32 may then decide otherwise:
    the test case is ambiguous, not the sampler wrong)."""
    z = logits.double().clone()
    if allowed is not None:
        z[~allowed] = NEG_INF
    if temperature < 1e-5:
        return (z == z.max()).double() / int((z == z.max()).sum())
    z = z / temperature
    vocab = z.shape[0]
    if 0 < top_k < vocab:
        kth = z.sort(descending=True).values[top_k - 1]
        z[z < kth] = NEG_INF
    p = z.softmax(-1)
    if top_p < 1.0:
        vals = p.sort(descending=True).values
        above = torch.cumsum(vals, 0) - vals  # mass of the tokens strictly more likely
        live = vals > 0
        assert ((above[live] - top_p).abs() > margin).all(), "top_p cutoff ambiguous"
        cut = vals[above < top_p].min()
        p[p < cut] = 0.0
        p = p / p.sum()
    if min_p > 0.0:
        thr = min_p * p.max()
        live = p > 0
        assert ((p[live] - thr).abs() > margin * thr).all(), "min_p cutoff ambiguous"
        p[p < thr] = 0.0
        p = p / p.sum()
    return p


def assert_follows(tokens: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """``tokens`` (1-D) were drawn from ``expected``: none outside its support, and Pearson's
    chi-square (bins with >= 5 expected draws, the rest merged) below its 1 - 1e-7 quantile."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    outside = (counts > 0) & (expected == 0)
    assert not outside.any(), (
        f"{what}: sampled tokens outside the support: {outside.nonzero().flatten().tolist()}"
    )
    exp = expected * n
    big = exp >= 5
    obs_bins, exp_bins = counts[big].tolist(), exp[big].tolist()
    rest_o, rest_e = float(counts[~big].sum()), float(exp[~big].sum())
    if rest_e >= 5:
        obs_bins.append(rest_o)
        exp_bins.append(rest_e)
    elif obs_bins:
        obs_bins[-1] += rest_o
        exp_bins[-1] += rest_e
    df = len(exp_bins) - 1
    if df < 1:
        return
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs_bins, exp_bins))
    z = 5.2  # one-sided 1 - 1e-7; Wilson-Hilferty quantile of chi-square(df)
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    tv = 0.5 * float((counts / n - expected).abs().sum())
    assert chi2 < crit, f"{what}: chi2 {chi2:.1f} >= {crit:.1f} (df {df}, TV {tv:.4f}, n {n})"


def test_oracle_is_the_transformers_warper_chain(sharp_model) -> None:
    """The documented order is transformers' order (temperature, top-k, top-p, min-p); on logits
    without ties the oracle and transformers' warpers give the same distribution."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    _, logits = sharp_model
    for t, k, p, m in [(0.7, 40, 0.9, 0.05), (1.5, 10, 0.6, 0.0), (1.0, -1, 0.3, 0.1), (2.0, 5, 1.0, 0.5)]:
        z = logits.double().unsqueeze(0)
        z = TemperatureLogitsWarper(t)(None, z)
        if k > 0:
            z = TopKLogitsWarper(k)(None, z)
        if p < 1.0:
            z = TopPLogitsWarper(p)(None, z)
        if m > 0:
            z = MinPLogitsWarper(m)(None, z)
        hf = z.softmax(-1)[0]
        assert torch.allclose(hf, expected_probs(logits, t, k, p, m), atol=1e-9), (t, k, p, m)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_model(tmp_path_factory):
    """(checkpoint folder, float32 next-token logits after PROMPT): the random llama fixture with
    its output layer scaled 4x, so that the distribution has a head (p 0.25) and a long tail."""
    from hf_fixtures import build_checkpoint

    folder = tmp_path_factory.mktemp("sharp_llama")
    model = build_checkpoint("llama", folder)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
        model.save_pretrained(str(folder), safe_serialization=True)
        logits = model(torch.tensor([PROMPT])).logits[0, -1].float()
    return folder, logits


@pytest.fixture(scope="module")
def engine(sharp_model):
    from llmir_lang.executor.engine import Engine

    eng = Engine(str(sharp_model[0]), device=DEVICE, dtype="float32")
    yield eng
    eng.shutdown()


def _draw(logits: torch.Tensor, params: list[SP], seed: int, **kw) -> torch.Tensor:
    rows = logits.unsqueeze(0).expand(len(params), -1) if logits.dim() == 1 else logits
    n = len(params)
    out = Sampler(rows.shape[1], DEVICE, seed=seed).sample(
        rows.to(DEVICE), params, [[]] * n, [[]] * n, [None] * n, **kw
    )
    return out.token_ids.cpu()


# --- the sampler on the model's logits -----------------------------------------------------------

CASES = {
    "plain": dict(temperature=1.0),
    "cold": dict(temperature=0.5),
    "hot": dict(temperature=2.5),
    "almost greedy": dict(temperature=1e-4),
    "very hot": dict(temperature=1e4),
    "top_p 1": dict(temperature=1.0, top_p=1.0),
    "top_p tiny": dict(temperature=1.0, top_p=0.01),
    "top_p 0.5": dict(temperature=1.0, top_p=0.5),
    "top_k 1": dict(temperature=1.0, top_k=1),
    "top_k 5": dict(temperature=1.0, top_k=5),
    "top_k > vocab": dict(temperature=1.0, top_k=1000),
    "min_p 0.2": dict(temperature=1.0, min_p=0.2),
    "min_p 0.99": dict(temperature=1.0, min_p=0.99),
    "all, cold": dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05),
    "all, hot": dict(temperature=1.5, top_k=10, top_p=0.6),
    "top_p and min_p": dict(temperature=1.2, top_p=0.8, min_p=0.1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_draws_follow_the_parameters(sharp_model, name: str) -> None:
    _, logits = sharp_model
    kw = CASES[name]
    n = 20000
    tokens = _draw(logits, [SP(**kw)] * n, seed=1)
    assert_follows(tokens, expected_probs(logits, **kw), name)


def test_rows_with_different_parameters_in_one_batch(sharp_model) -> None:
    """Rows of a batch each follow their own parameters (filters vectorized across rows)."""
    _, logits = sharp_model
    names = ["all, hot", "top_k 5", "plain", "min_p 0.2", "top_p 0.5"]
    n = 6000
    params = [SP(**CASES[names[i % len(names)]]) for i in range(n * len(names))]
    tokens = _draw(logits, params, seed=2)
    for j, name in enumerate(names):
        assert_follows(tokens[j :: len(names)], expected_probs(logits, **CASES[name]), name)


def test_seeded_rows_follow_the_parameters(sharp_model) -> None:
    """One draw from each of 6000 seeds (the engine's per-request generators) follows the same law."""
    _, logits = sharp_model
    n = 6000
    kw = CASES["all, cold"]
    params = [SP(**kw, seed=i) for i in range(n)]
    gens = [Sampler.make_generator(i, DEVICE) for i in range(n)]
    rows = logits.unsqueeze(0).expand(n, -1).to(DEVICE)
    out = Sampler(rows.shape[1], DEVICE).sample(rows, params, [[]] * n, [[]] * n, gens)
    assert_follows(out.token_ids.cpu(), expected_probs(logits, **kw), "seeded")


# --- ties at the cutoffs ---------------------------------------------------------------------------


TIED = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0, -1.0, 1.0, -3.0])  # p(2) 0.37; four 1's at 0.14


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0, top_p=0.6),  # the cut falls inside the run of 1's
        dict(temperature=1.0, top_k=2),  # top-k keeps every logit tied with the k-th
        dict(temperature=1.0, top_k=3, top_p=0.5),
        dict(temperature=1.0, min_p=0.36),  # ratio of a 1 to the 2: e^-1 = 0.368
        dict(temperature=1.0, top_k=1),
    ],
)
def test_tied_logits_at_a_cutoff_are_kept_together(kw) -> None:
    """Tokens with equal logits have equal probability, whichever side of a cutoff they sit and
    wherever the sort puts them (top-p kept only the tied token the sort placed last)."""
    n = 12000
    for row in (TIED, TIED.flip(0)):
        tokens = _draw(row, [SP(**kw)] * n, seed=3)
        assert_follows(tokens, expected_probs(row, **kw), str(kw))


def test_greedy_ties_take_the_lowest_id_on_every_path() -> None:
    row = torch.tensor([0.0, 3.0, 1.0, 3.0, 3.0, -1.0])
    allowed = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    words = (allowed.int() << torch.arange(6)).sum(-1, dtype=torch.int32).unsqueeze(1)
    for params in (
        [SP()] * 2,
        [SP(return_logprob=True)] * 2,
        [SP(repetition_penalty=1.0, top_logprobs_num=2)] * 2,
    ):
        fast = Sampler(6).sample(row.repeat(2, 1), params, [[]] * 2, [[]] * 2, [None] * 2)
        assert fast.token_ids.tolist() == [1, 1]
        masked = Sampler(6).sample(row.repeat(2, 1), params, [[]] * 2, [[]] * 2, [None] * 2, bitmask=words)
        assert masked.token_ids.tolist() == [1, 3]
    bf16 = Sampler(6).sample(row.repeat(2, 1).bfloat16(), [SP()] * 2, [[]] * 2, [[]] * 2, [None] * 2)
    assert bf16.token_ids.tolist() == [1, 1]


# --- numeric edges --------------------------------------------------------------------------------


def test_a_huge_temperature_draws_uniformly_over_the_allowed_tokens() -> None:
    """Above ~3.4e38 the temperature is inf in float32 and -inf / inf is NaN: every row drew
    token 0, masked (banned, or by the constraint) or not."""
    row = torch.tensor([3.0, 1.0, 0.0, -2.0, 5.0, 0.5, 0.0, 1.0])
    n = 8000
    for temp in (1e30, 1e39, 1e300):
        tokens = _draw(row, [SP(temperature=temp)] * n, seed=4, banned_ids=[[0, 4]] * n)
        allowed = torch.ones(8, dtype=torch.bool)
        allowed[[0, 4]] = False
        assert_follows(tokens, allowed.double() / 6, f"temperature {temp}")


def test_extreme_repetition_penalties_stay_finite() -> None:
    """A penalty of 1e-50 is 0 in float32: a seen positive logit / 0 = inf made the row NaN and the
    draw token 0 (neither the encouraged token nor an allowed one). Penalties are clamped."""
    row = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5, 0.0, 0.0, 4.0])
    n = 200
    for temp in (0.0, 1.0):
        for pen, seen, want in ((1e-50, [2, 7], {2}), (1e50, [2, 3, 7], None)):
            out = Sampler(8, seed=5).sample(
                row.repeat(n, 1),
                [SP(temperature=temp, repetition_penalty=pen, return_logprob=True)] * n,
                [seen] * n,
                [[]] * n,
                [None] * n,
                banned_ids=[[7]] * n,
            )
            got = set(out.token_ids.tolist())
            assert out.logprobs is not None and torch.isfinite(out.logprobs).all()
            if want is not None:
                assert got == want, (pen, temp, got)
            else:  # token 3 (-1 * 1e30) and the banned 7 are out; greedy takes the 2.0 logit
                assert got and not got & {3, 7}, (pen, temp, got)
                assert temp or got == {1}


# --- the engine, end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["all, cold", "top_k 5", "top_p and min_p"])
def test_engine_first_tokens_follow_the_parameters(sharp_model, engine, name: str) -> None:
    """3000 seeded one-token requests of one prompt through the whole engine (scheduler, radix
    cache, model, sampler) against the oracle on transformers' logits."""
    _, logits = sharp_model
    kw = CASES[name]
    n = 3000
    res = engine.generate([PROMPT] * n, [{"max_new_tokens": 1, "seed": i, **kw} for i in range(n)])
    tokens = torch.tensor([r.token_ids[0] for r in res])
    assert_follows(tokens, expected_probs(logits, **kw), name)


def _regex_allowed(engine, pattern: str, vocab: int) -> torch.Tensor:
    """First tokens a regex admits, from the tokens' text alone: tokens whose text is a prefix of
    some match; for ``[a-z]+`` that is text made of lowercase letters only."""
    allowed = torch.zeros(vocab, dtype=torch.bool)
    hf = engine.tokenizer.hf
    for t in range(len(hf)):
        text = hf.decode([t])
        allowed[t] = bool(re.fullmatch(pattern, text)) and t not in engine.tokenizer.eos_token_ids
    return allowed


def test_engine_samples_the_renormalized_distribution_under_a_constraint(sharp_model, engine) -> None:
    """Under a regex the draw is the model's distribution restricted to the allowed tokens, then
    tempered and filtered (top-p over the allowed mass, not over the whole vocabulary), and the
    reported logprob is ``log_softmax`` of the masked logits before temperature (sampler.py)."""
    _, logits = sharp_model
    allowed = _regex_allowed(engine, "[a-z]+", logits.shape[0])
    assert 20 < int(allowed.sum()) < 200
    kw = dict(temperature=1.5, top_k=8, top_p=0.9)
    want = expected_probs(logits, **kw, allowed=allowed)
    # what filtering before masking would draw: far from the right answer (the test can tell)
    wrong = expected_probs(logits, **kw)
    wrong = torch.where(allowed, wrong, 0.0)
    if wrong.sum() > 0:
        assert 0.5 * float((wrong / wrong.sum() - want).abs().sum()) > 0.1
    n = 3000
    spec = spec_from_regex("[a-z]+")
    res = engine.generate(
        [PROMPT] * n,
        [
            {"max_new_tokens": 1, "seed": i, "constraint": spec, "return_logprob": True, **kw}
            for i in range(n)
        ],
    )
    tokens = torch.tensor([r.token_ids[0] for r in res])
    assert_follows(tokens, want, "regex")
    masked = logits.double().masked_fill(~allowed, NEG_INF).log_softmax(-1)
    got = torch.tensor([r.logprobs[0] for r in res], dtype=torch.float64)
    assert torch.allclose(got, masked[tokens], atol=1e-4)
