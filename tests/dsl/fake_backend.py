"""A deterministic fake ``Backend`` for DSL tests: no model, instant, and it records every call.

Generation depends only on the full text before it (prompt plus what the chain appended so far),
so a fused chain and call-by-call runs give the same text, as on a real greedy engine. A "token"
is one word (`` w``); ``stop`` strings cut the output (excluded), ``max_tokens`` bounds it and
``min_tokens`` delays stops. Scoring: a continuation scores high when the prompt contains
``PREFER:<continuation>``, otherwise by a hash of (prompt, continuation).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from llmir_lang.errors import EmptyPromptError, NotYetSupportedError
from llmir_lang.executor.backend import Backend, ChainRequest, ChainResult, GenStep, StepResult

WORDS = ("alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "lam", "mu")


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def fake_generate(prompt: str, step: GenStep) -> tuple[str, str]:
    """(text, finish_reason) of one gen after ``prompt``."""
    p = step.params
    out = ""
    for i in range(p.max_new_tokens):
        word = " " + WORDS[_h(prompt + out) % len(WORDS)]
        out += word
        if i + 1 >= p.min_new_tokens:
            for s in p.stop:
                if s in out:
                    return out[: out.index(s)], "stop"
            if not p.ignore_eos and _h("eos" + prompt + out) % 7 == 0:
                return out, "stop"
    return out, "length"


class FakeBackend(Backend):
    def __init__(self, delay: float = 0.0, workers: int = 8) -> None:
        self.delay = delay
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.lock = threading.Lock()
        self.requests: list[ChainRequest] = []
        self.scores: list[tuple[str, list[str]]] = []
        self.unpins: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.scores.clear()
            self.unpins.clear()
            self.max_in_flight = 0

    @property
    def gen_requests(self) -> list[ChainRequest]:
        return [r for r in self.requests if not r.pin]

    @property
    def prefills(self) -> list[ChainRequest]:
        return [r for r in self.requests if r.pin]

    def submit(self, request: ChainRequest, on_chunk=None) -> Future:
        if not request.prompt and not (request.steps and isinstance(request.steps[0], str)):
            raise EmptyPromptError("the prompt is empty; give at least one token of text")
        for step in request.steps:
            if isinstance(step, GenStep) and step.constraint is not None:
                raise NotYetSupportedError("the fake backend does not do constraints")
        with self.lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return self.pool.submit(self._run, request, on_chunk)

    def _run(self, request: ChainRequest, on_chunk) -> ChainResult:
        try:
            if self.delay:
                time.sleep(self.delay)
            text = request.prompt
            results = []
            index = 0
            for step in request.steps:
                if isinstance(step, str):
                    text += step
                    continue
                out, reason = fake_generate(text, step)
                if on_chunk is not None:
                    for word in out.split(" ")[1:]:
                        on_chunk(index, " " + word)
                results.append(
                    StepResult(step.name, out, [len(w) for w in out.split()], reason, len(text.split()),
                               len(out.split()), 0, [-0.5] * len(out.split()) if step.params.return_logprob else None)
                )  # fmt: skip
                text += out
                index += 1
            return ChainResult(results, text[len(request.prompt) :])
        finally:
            with self.lock:
                self.in_flight -= 1

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        if not prompt:
            raise EmptyPromptError("score() needs a non-empty prompt")
        with self.lock:
            self.scores.append((prompt, list(continuations)))
        out = []
        for c in continuations:
            if f"PREFER:{c}" in prompt:
                out.append([-0.01] * max(1, len(c.split())))
            else:
                out.append(
                    [-1.0 - (_h(prompt + c + str(i)) % 100) / 50 for i in range(max(1, len(c.split())))]
                )
        return out

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def unpin(self, prompt: str) -> None:
        with self.lock:
            self.unpins.append(prompt)
