"""Minimal repros of what tests/executor/test_stress_scheduler.py found, one test per finding."""

from __future__ import annotations

from llmir_lang.executor.constraints import spec_from_regex
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams

# seed 1009 of the stress test, request 12
PROMPT_1009 = [
    42, 255, 85, 264, 53, 295, 175, 240, 10, 264, 71, 184, 73, 74, 237, 113, 222, 11, 90, 235, 237,
    156, 158, 140, 113, 214, 193, 176, 176, 20, 230, 276, 139, 164, 100, 74, 69, 278, 214, 262, 136,
    101, 112, 208, 213, 211, 293, 186, 251, 269, 279, 199, 292, 109, 110, 4, 258,
]  # fmt: skip


def _leaks_nothing(eng: Engine) -> None:
    stats = eng.stats()
    assert stats["cache"]["protected_tokens"] == 0
    assert stats["pool"]["used"] == stats["cache"]["cached_tokens"]


def test_draft_past_the_constraints_end_does_not_add_a_token(checkpoints):
    # jump-forward forces the regex's last text ("d" of "cd") while a speculative verify step's KV
    # still holds draft tokens past the sampled one: the forced text used to be left to one more
    # step (its KV looked stale), which sampled EOS after the constraint had ended the output
    folder, _ = checkpoints("llama")
    sp = SamplingParams(max_new_tokens=14, ignore_eos=True, constraint=spec_from_regex(r"ab[0-9]+cd"))
    out = {}
    for drafts in (0, 3):
        with Engine(str(folder), device="cpu", speculative_draft_tokens=drafts) as eng:
            out[drafts] = eng.generate(PROMPT_1009, sp)
            _leaks_nothing(eng)
    assert out[3].meta["jump_forward_tokens"] > 0 and out[3].meta["spec_draft_tokens"] > 0
    assert out[3].token_ids == out[0].token_ids
    assert out[3].text == out[0].text == "ab7131113cd"
    assert out[3].finish_reason == out[0].finish_reason == "stop"
