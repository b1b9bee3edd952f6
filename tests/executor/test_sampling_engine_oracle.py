"""The engine's reported logprobs, greedy tokens and seeded draws against transformers on the same
weights, and how ``min_new_tokens`` / ``ignore_eos`` / ``stop_token_ids`` shape what is sampled.

Oracle: one transformers forward over prompt + output gives every position's logits; a reported
logprob is ``log_softmax`` of them (no penalty or mask in play), the top logprobs its top-k, greedy
tokens its argmax. The first-token distribution under ``min_new_tokens`` is the model's, renormalized
without EOS and the stop ids (chi-square as in ``test_sampling_distribution``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmir_lang.executor.constraints import spec_from_regex

PROMPT = [5, 17, 42, 99, 7]
LOOPY = [5, 17, 42, 99, 7, 5, 17, 42, 99, 7, 5, 17, 42]  # prompt lookup finds drafts in it


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(folder, HF model, eos id X): the random llama fixture with its output layer scaled 4x;
    config.json names X, the most likely token after PROMPT (p ~0.25), as a second EOS."""
    from hf_fixtures import build_checkpoint

    folder = tmp_path_factory.mktemp("eos_llama")
    hf = build_checkpoint("llama", folder)
    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)
        hf.save_pretrained(str(folder), safe_serialization=True)
        eos = int(hf(torch.tensor([PROMPT])).logits[0, -1].argmax())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = [0, eos]
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, hf, eos


@pytest.fixture(scope="module")
def engine(model):
    from llmir_lang.executor.engine import Engine

    eng = Engine(str(model[0]), device="cpu")
    assert eng.speculative_draft_tokens > 0  # the CPU default: verify steps are in play
    yield eng
    eng.shutdown()


def _log_softmax(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def test_reported_logprobs_are_transformers_log_softmax(model, engine) -> None:
    """Sampled (temperature 0.8, which the logprobs do not include: they are the model's), with
    drafts verified, twice (the second run reads the prompt from the radix cache)."""
    _, hf, _ = model
    params = {
        "max_new_tokens": 16,
        "temperature": 0.8,
        "seed": 3,
        "ignore_eos": True,
        "top_logprobs_num": 5,
        "return_prompt_logprob": True,
    }
    first = engine.generate(LOOPY, params)
    again = engine.generate(LOOPY, params)  # prompt logprobs recompute the prompt
    cached = engine.generate(LOOPY, {**params, "return_prompt_logprob": False})
    assert again.token_ids == first.token_ids == cached.token_ids and cached.cached_tokens > 0
    assert cached.logprobs == pytest.approx(first.logprobs, abs=1e-4)
    for r in (first, again):
        ids = LOOPY + r.token_ids
        lsm = _log_softmax(hf, ids)
        n = len(LOOPY)
        assert len(r.logprobs) == len(r.top_logprobs) == len(r.token_ids) == 16
        want = lsm[torch.arange(n - 1, len(ids) - 1), torch.tensor(r.token_ids)]
        assert torch.allclose(torch.tensor(r.logprobs, dtype=torch.float64), want, atol=1e-4)
        for i, top in enumerate(r.top_logprobs):
            vals = [v for _, v in top]
            assert vals == sorted(vals, reverse=True) and len(top) == 5
            ref = lsm[n - 1 + i].topk(5)
            assert torch.allclose(torch.tensor(vals, dtype=torch.float64), ref.values, atol=1e-4)
            assert [t for t, _ in top] == ref.indices.tolist()
        assert [t for t, _ in r.prompt_logprobs] == LOOPY[1:]
        want = lsm[torch.arange(n - 1), torch.tensor(LOOPY[1:])]
        got = torch.tensor([v for _, v in r.prompt_logprobs], dtype=torch.float64)
        assert torch.allclose(got, want, atol=1e-4)


def test_greedy_is_transformers_argmax_on_every_path(model, engine) -> None:
    from hf_fixtures import hf_greedy

    _, hf, _ = model
    want, want_lps = hf_greedy(hf, LOOPY, 16)
    for extra in ({}, {"return_logprob": True}, {"temperature": 1e-6, "seed": 9}):
        r = engine.generate(LOOPY, {"max_new_tokens": 16, "ignore_eos": True, **extra})
        assert r.token_ids == want, extra
        if r.logprobs is not None:
            assert max(abs(a - b) for a, b in zip(r.logprobs, want_lps)) < 1e-4


def test_a_seed_fixes_the_tokens_whatever_runs_beside_it(model, engine) -> None:
    """The same seed gives the same tokens alone (cache cold and warm), at any batch position,
    beside greedy, seeded, unseeded and constrained (jump-forward, mixed steps) requests, with
    speculation on or off and with run-ahead decode; other seeds give other tokens."""
    from llmir_lang.executor.engine import Engine

    # a prompt holding its own greedy continuation: drafts are proposed (and verified) for it
    prompt = LOOPY + engine.generate(LOOPY, {"max_new_tokens": 30, "ignore_eos": True}).token_ids + LOOPY
    base = {"max_new_tokens": 24, "temperature": 0.3, "top_p": 0.95, "ignore_eos": True}
    seed = next(
        s for s in range(20) if engine.generate(prompt, {**base, "seed": s}).meta["spec_draft_tokens"]
    )
    mine = {**base, "seed": seed}
    ref = engine.generate(prompt, mine).token_ids
    assert engine.generate(prompt, mine).token_ids == ref  # warm cache
    mates = [
        ([11, 12, 13], {"max_new_tokens": 20, "ignore_eos": True}),
        ([11, 12, 13, 14], {"max_new_tokens": 30, "temperature": 1.3, "seed": 7, "ignore_eos": True}),
        (LOOPY[:9], {"max_new_tokens": 12, "temperature": 0.9}),
        ([9, 8, 7], {"max_new_tokens": 12, "constraint": spec_from_regex("the [a-z]+ brown [a-z]+")}),
    ]
    for at in (0, 2, 4):
        batch = mates[:at] + [(prompt, mine)] + mates[at:]
        res = engine.generate([p for p, _ in batch], [sp for _, sp in batch])
        assert res[at].token_ids == ref, at
    others = {tuple(engine.generate(prompt, {**mine, "seed": seed + s}).token_ids) for s in (1, 2, 3)}
    assert len(others | {tuple(ref)}) == 4
    for kw in ({"speculative_draft_tokens": 0}, {"speculative_draft_tokens": 0, "run_ahead": True}):
        other = Engine(str(model[0]), device="cpu", **kw)
        try:
            assert other.generate(prompt, mine).token_ids == ref, kw
        finally:
            other.shutdown()


def _chi2_follows(tokens: list[int], expected: torch.Tensor) -> None:
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=expected.numel()).double()
    assert not ((counts > 0) & (expected == 0)).any(), "sampled outside the support"
    exp = expected * n
    big = exp >= 5
    o, e = counts[big].tolist() + [float(counts[~big].sum())], exp[big].tolist() + [float(exp[~big].sum())]
    df = len(e) - 1
    chi2 = sum((a - b) ** 2 / b for a, b in zip(o, e) if b > 0)
    crit = df * (1 - 2 / (9 * df) + 5.2 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < crit, f"chi2 {chi2:.1f} >= {crit:.1f} (df {df})"


def test_min_new_tokens_bans_eos_and_stop_ids_until_reached(model, engine) -> None:
    _, hf, eos = model
    lsm = _log_softmax(hf, PROMPT)[-1]
    stop = int(lsm.topk(2).indices[1])  # the second most likely token
    n = 2000
    res = engine.generate(
        [PROMPT] * n,
        [
            {
                "max_new_tokens": 2,
                "min_new_tokens": 1,
                "temperature": 1.0,
                "seed": i,
                "stop_token_ids": [stop],
                "return_logprob": True,
            }
            for i in range(n)
        ],
    )
    first = [r.token_ids[0] for r in res]
    kept = torch.ones_like(lsm, dtype=torch.bool)
    kept[[0, eos, stop]] = False
    renorm = lsm.masked_fill(~kept, float("-inf")).log_softmax(-1)
    _chi2_follows(first, renorm.exp())
    # the reported logprob is of the distribution the token was drawn from (banned ids masked)
    got = torch.tensor([r.logprobs[0] for r in res], dtype=torch.float64)
    assert torch.allclose(got, renorm[torch.tensor(first)], atol=1e-4)
    # after min_new_tokens they may end the request, and then they do
    ended = [r for r in res if r.finish_reason == "stop"]
    assert ended and all(r.token_ids[-1] in (0, eos, stop) and len(r.token_ids) == 2 for r in ended)


def test_eos_ends_the_request_unless_ignore_eos(model, engine) -> None:
    _, hf, eos = model
    p_eos = float(_log_softmax(hf, PROMPT)[-1, eos].exp())
    n = 1000
    plain = engine.generate(
        [PROMPT] * n, [{"max_new_tokens": 3, "temperature": 1.0, "seed": i} for i in range(n)]
    )
    hits = [r for r in plain if r.token_ids[0] == eos]
    assert abs(len(hits) / n - p_eos) < 5 * math.sqrt(p_eos * (1 - p_eos) / n)
    assert all(r.finish_reason == "stop" and r.token_ids == [eos] for r in hits)
    kept = engine.generate(
        [PROMPT] * n,
        [{"max_new_tokens": 3, "temperature": 1.0, "seed": i, "ignore_eos": True} for i in range(n)],
    )
    # the same seeds draw the same first tokens; with ignore_eos an EOS is an ordinary token
    assert [r.token_ids[0] for r in kept] == [r.token_ids[0] for r in plain]
    assert all(len(r.token_ids) == 3 and r.finish_reason == "length" for r in kept)


def test_engine_seed_makes_unseeded_sampling_repeat(model) -> None:
    """``Engine(seed=...)`` seeds the generator of requests without their own ``seed`` (it was
    checked and stored, never used: every engine sampled differently)."""
    from llmir_lang.executor.engine import Engine

    params = {"max_new_tokens": 24, "temperature": 1.0, "ignore_eos": True}

    def tokens(seed: int) -> list[int]:
        with Engine(str(model[0]), device="cpu", seed=seed) as eng:
            return eng.generate([5, 9, 11, 13], params).token_ids

    first = tokens(0)
    assert tokens(0) == first
    assert tokens(1) != first
