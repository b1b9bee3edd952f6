"""Differential fuzz over program shapes: every pass alone, all of them, none, alone and batched.

``test_random_programs_engine.py`` compares the default pipeline with ``passes=""`` on programs
of one shape per batch. This test draws the shapes it does not: ``s.copy()`` (kept as a value
and as a with-block), nested forks joined at different depths (and branch variables read back
from the branch after its join), ``json_schema`` / ``regex`` / ``choices`` / ``dtype`` gens
inside fork branches (some with a ``stop`` that cuts the value, some with a regex that fails when
the gen runs), gens with ``stop`` and ``min_tokens`` together, ``ignore_eos``, ``stop_regex`` or
logprobs, selects with every ``choices_method`` (as objects or names) over choices where one is
a prefix of another or that repeat, roles as ``with s.user():``, ``s.user(expr)``,
``llmir.user(...)`` and markers, nested ``var_scope``s, ``s.messages()`` read in the body, an
exception raised by the body at a random point, and a failed gen caught in the body (the program
goes on with what ran). A batch holds programs of different shapes, one of which may raise.

Oracle (greedy, fp32 on the CPU): each program run alone with the default pipeline, with
``passes=""`` (call by call) and with each single pass gives the same text, variables (and the
finish reason / token counts / picked choice of each gen and select), fork and copy texts, and
error (type and message); ``run_batch`` (one thread per program, or one for all) gives each
program what running it alone gives; with ``stream=True`` the chunks add up to the text, and a
program where nothing failed ends as it does without a stream. The same runs on the fake backend
(``fake_backend.py``), which does not share a prefix within a batch, so the evaluator prefills
and pins shared prefixes there: every pin must be released, after its prefill.

Locally: ``LLMIR_FUZZ_SHAPES=N`` programs instead of the CI default, ``LLMIR_FUZZ_SHAPES_SEED=K``
another reproducible set.
"""

from __future__ import annotations

import os
import random
import re
import threading
from typing import Any

import pytest
import torch

import llmir_lang as llmir
from llmir_lang.errors import LLMIRError

torch.set_num_threads(1)
N_PROGRAMS = int(os.environ.get("LLMIR_FUZZ_SHAPES", "80"))
BASE_SEED = int(os.environ.get("LLMIR_FUZZ_SHAPES_SEED", "0"))
HANG_S = 30.0
SINGLE_PASSES = ["canonicalize", "prefix-share", "fork-join", "select-trie", "fuse-constants"]

TEXTS = ["Q: ", "A:", " ", "\n", "Hello world", "naïve ", "日本語", "x", ", ", "The answer is", "é", "\n\n"]
LONG_TEXT = "Q: What is the capital of France?\nA: Paris\nQ: What is 2 + 2?\nA: "
SELECT_CHOICES = [
    ("yes", "yesterday", "no"),  # one a prefix of another
    ("Paris", "Paris, France", "Par"),
    (" a", " a b", " a b c"),  # prefixes at clean cuts: a real trie
    ("\n1", "\n2", "\n"),
    ("x", "x", "y"),  # a repeat, scored once
    ("only",),
    ("é", "ée", "日本"),
    (" True", " False"),
]
METHODS = [
    "token_length_normalized",
    "sum_logprob",
    "unconditional_likelihood_normalized",
    "greedy_token_selection",
    llmir.greedy_token_selection,
    llmir.unconditional_likelihood_normalized,
]
SCHEMAS = [
    {"enum": ["red", "green", "greenish"]},
    {"type": "boolean"},
    {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    },
]
# the last two fail when the gen runs: no token can start a match; too large for the matcher
REGEXES = [r"[a-z]{1,4}", r"(yes|no|maybe)", r"(ab|a)c?", r"[0-9]+", r"[^\x00-\x{10FFFF}]", "(a{1000}){1000}"]
GEN_CHOICES = [("red", "green", "greenish"), (" a", " ab", " abc")]
STOPS = ["\n", "e", ("a", "i"), " ", "an"]


class Boom(Exception):
    """What a program raises on purpose."""


# --- drawing a program ------------------------------------------------------------------------
# ops (tuples, so a failing program prints as one line that can be pasted back):
# ("text", t) | ("arg",) | ("gen", name, kwargs) | ("select", name, choices, method index)
# ("read", name) | ("if", name, then, else) | ("tail", k) | ("msgs",) | ("raise",)
# ("scope", name, ops) | ("role", role, form, ops) | ("try", ops)
# ("fork", n, template, extra, between, mode, post) | ("copy", form, ops, post)


class Drawer:
    def __init__(self, rng: random.Random, prefix: str) -> None:
        self.rng = rng
        self.prefix = prefix
        self.count = 0
        self.calls = 0

    def name(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"

    def text(self) -> str:
        r = self.rng.random()
        return LONG_TEXT if r < 0.08 else self.rng.choice(TEXTS)

    def gen(self) -> tuple:
        rng = self.rng
        self.calls += 1
        name = self.name() if rng.random() < 0.85 else None
        kw: dict[str, Any] = {"max_tokens": rng.randint(0, 6)}
        kind = rng.choice(
            [
                "plain",
                "plain",
                "stop",
                "stop_min",
                "stop_regex",
                "regex",
                "choices",
                "json",
                "dtype",
                "eos",
                "logprobs",
            ]
        )
        if kind in ("stop", "stop_min"):
            stop = rng.choice(STOPS)
            kw["stop"] = list(stop) if isinstance(stop, tuple) else stop
            if kind == "stop_min":
                kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
        elif kind == "regex":
            kw["regex"] = rng.choice(REGEXES)
        elif kind == "choices":
            kw["choices"] = list(rng.choice(GEN_CHOICES))
        elif kind == "json":
            kw["json_schema"] = rng.choice(SCHEMAS)
            kw["max_tokens"] = rng.randint(2, 10)
        elif kind == "dtype":
            kw["dtype"] = rng.choice(["int", "bool", "float"])
        elif kind == "stop_regex":
            kw["stop_regex"] = rng.choice([r"\n", r"[aeiou]{2}", r"\d"])
        elif kind == "logprobs":
            # a prompt's logprobs: the gen starts a request of its own (never fused after another)
            key = rng.choice(["return_logprob", "logprob_start_len", "top_logprobs_num"])
            kw[key] = True if key == "return_logprob" else rng.choice([1, 2])
        elif kind == "eos":
            kw["ignore_eos"] = True
            kw["min_tokens"] = rng.randint(0, kw["max_tokens"])
        if kind in ("regex", "choices", "json", "dtype") and rng.random() < 0.25:
            kw["stop"] = rng.choice(STOPS[:2])  # a stop inside a constrained value fails the gen
        if rng.random() < 0.15:
            kw["temperature"] = 0.8
            kw["seed"] = 7  # seeded sampling: the same tokens fused or not
        return ("gen", name, tuple(sorted(kw.items(), key=lambda kv: kv[0])))

    def select(self) -> tuple:
        self.calls += 1
        name = self.name() if self.rng.random() < 0.9 else None
        return ("select", name, self.rng.choice(SELECT_CHOICES), self.rng.randrange(len(METHODS)))

    def ops(
        self, avail: list[str], *, depth: int, in_role: bool, static: bool = False, lo: int = 0, hi: int = 5
    ) -> tuple:
        """Ops on one state; ``avail`` (extended) lists the variables readable after them."""
        rng = self.rng
        out: list[tuple] = []
        for _ in range(rng.randint(max(lo, 1 if static else 0), hi)):
            kinds = ["text", "text", "arg", "call", "call", "call"]
            if not static:
                kinds += ["tail", "scope", "try"]
                if avail:
                    kinds += ["read", "if"]
                if not in_role:
                    kinds += ["role", "role"]
                if depth < 3:
                    kinds += ["fork", "fork", "copy"]
                if rng.random() < 0.15:
                    kinds.append("msgs")
                if rng.random() < 0.04:
                    kinds.append("raise")
            kind = rng.choice(kinds)
            if kind == "call" and self.calls >= 9:
                kind = "text"
            if kind == "text":
                out.append(("text", self.text()))
            elif kind == "arg":
                out.append(("arg",))
            elif kind == "call":
                op = self.gen() if rng.random() < 0.7 else self.select()
                out.append(op)
                if op[1] is not None:
                    avail.append(op[1])
            elif kind == "tail":
                out.append(("tail", rng.randint(1, 5)))
            elif kind == "msgs":
                out.append(("msgs",))
            elif kind == "raise":
                out.append(("raise",))
            elif kind == "read":
                out.append(("read", rng.choice(avail)))
            elif kind == "if":
                name = rng.choice(avail)
                then = self.ops(list(avail), depth=depth + 1, in_role=in_role, hi=2)
                other = self.ops(list(avail), depth=depth + 1, in_role=in_role, hi=2)
                out.append(("if", name, then, other))
            elif kind == "scope":
                name = self.name()
                out.append(("scope", name, self.ops(avail, depth=depth + 1, in_role=in_role, hi=3)))
                avail.append(name)
            elif kind == "try":
                # what the block defines may have failed: not read after it
                out.append(("try", self.ops(list(avail), depth=depth + 1, in_role=in_role, lo=1, hi=3)))
            elif kind == "role":
                role = rng.choice(["system", "user", "assistant"])
                form = rng.choice(["with", "call", "prim", "markers"])
                body = self.ops(avail, depth=depth + 1, in_role=True, static=form in ("call", "prim"), hi=3)
                out.append(("role", role, form, body))
            elif kind == "fork":
                out.append(self.fork(avail, depth=depth, in_role=in_role))
            elif kind == "copy":
                form = rng.choice(["with", "value"])
                inner = list(avail)
                body = self.ops(inner, depth=depth + 1, in_role=in_role, lo=1, hi=3)
                new = [k for k in inner if k not in avail]
                post = tuple(rng.sample(new, min(len(new), rng.randint(0, 2))))
                if form == "with":  # joined on exit: its variables come back as lists of one
                    avail += new
                out.append(("copy", form, body, post))
        return tuple(out)

    def fork(self, avail: list[str], *, depth: int, in_role: bool) -> tuple:
        rng = self.rng
        n = rng.randint(1, 3)
        inner = list(avail)
        template = self.ops(inner, depth=depth + 1, in_role=in_role, hi=3)
        extra = tuple(
            (rng.randrange(n), self.ops(list(inner), depth=depth + 1, in_role=in_role, lo=1, hi=2))
            for _ in range(rng.randint(0, 2))
        )
        between = self.ops(avail, depth=depth + 1, in_role=in_role, hi=2) if rng.random() < 0.2 else ()
        mode = rng.choice(["gather_variable", "concate_and_append", "concate_and_append", None])
        new = [k for k in inner if k not in avail]
        # branch variables read from a branch after the fork (joined or not)
        post = tuple((rng.randrange(n), k) for k in rng.sample(new, min(len(new), rng.randint(0, 2))))
        if mode is not None:
            avail += new
        return ("fork", n, template, extra, between, mode, post)


def draw_program(rng: random.Random, prefix: str = "v", common: tuple = ()) -> tuple:
    d = Drawer(rng, prefix)
    ops = d.ops([], depth=0, in_role=False, lo=2, hi=8)
    start = (("text", d.text()),) if rng.random() < 0.95 else ()  # an empty prompt fails alike
    return (*common, *start, *ops)


def draw_case(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    n = rng.choice([1, 1, 2, 3])
    common = (("text", LONG_TEXT),) if n > 1 and rng.random() < 0.5 else ()
    items = [
        (draw_program(rng, prefix=f"v{i}_", common=common), rng.choice(["", "Ada", "Bob\n", "日本 "]))
        for i in range(n)
    ]
    return {"seed": seed, "items": items}


# --- the interpreter --------------------------------------------------------------------------
def _prim(op: tuple, arg: str) -> Any:
    kind = op[0]
    if kind == "text":
        return op[1]
    if kind == "arg":
        return arg
    if kind == "select":
        return llmir.select(op[1], list(op[2]), choices_method=METHODS[op[3]])
    assert kind == "gen", op
    return llmir.gen(op[1], **dict(op[2]))


def _text_of(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "~"
    return "|".join(_text_of(x) for x in v)


def run_ops(s: Any, ops: tuple, arg: str, rec: list) -> None:
    for op in ops:
        kind = op[0]
        if kind in ("text", "arg", "gen", "select"):
            s += _prim(op, arg)
        elif kind == "read":
            s += _text_of(s[op[1]])
        elif kind == "if":
            run_ops(s, op[2] if len(_text_of(s[op[1]])) % 2 == 0 else op[3], arg, rec)
        elif kind == "tail":
            s += s.text()[-op[1] :]
        elif kind == "msgs":
            s += f"<{len(s.messages())}>"
        elif kind == "raise":
            raise Boom(f"boom after {len(s.text())} chars")
        elif kind == "scope":
            with s.var_scope(op[1]):
                run_ops(s, op[2], arg, rec)
        elif kind == "try":
            try:
                run_ops(s, op[1], arg, rec)
            except LLMIRError as e:
                s += f"<{type(e).__name__}>"
        elif kind == "role":
            _, role, form, body = op
            if form == "with":
                with getattr(s, role)():
                    run_ops(s, body, arg, rec)
            elif form == "call":  # s.user(expr)
                getattr(s, role)([_prim(o, arg) for o in body])
            elif form == "prim":  # s += llmir.user(expr)
                s += getattr(llmir, role)([_prim(o, arg) for o in body])
            else:
                s += getattr(llmir, f"{role}_begin")()
                run_ops(s, body, arg, rec)
                s += getattr(llmir, f"{role}_end")()
        elif kind == "fork":
            _, n, template, extra, between, mode, post = op
            forks = s.fork(n)
            rec.extend(forks)
            for j in range(n):
                run_ops(forks[j], template, arg, rec)
            for j, more in extra:
                run_ops(forks[j], more, arg, rec)
            run_ops(s, between, arg, rec)
            if mode is not None:
                forks.join(mode)
            for j, name in post:
                s += _text_of(forks[j][name])
        elif kind == "copy":
            _, form, body, post = op
            if form == "with":
                with s.copy() as c:
                    rec.append(c)
                    run_ops(c, body, arg, rec)
            else:
                c = s.copy()
                rec.append(c)
                run_ops(c, body, arg, rec)
            for name in post:
                s += _text_of(c[name])
        else:
            raise AssertionError(op)


@llmir.function
def interp(s, ops, arg, rec):
    rec.append(s)
    run_ops(s, ops, arg, rec)


# --- outcomes ---------------------------------------------------------------------------------
META_KEYS = ("finish_reason", "completion_tokens", "prompt_tokens", "matched_stop", "picked")


def _meta(m: Any) -> Any:
    if isinstance(m, dict) and "branches" in m:
        return [_meta(b) for b in m["branches"]]
    return tuple((k, m.get(k)) for k in META_KEYS if k in m)


def _safe(f: Any) -> Any:
    try:
        return f()
    except Exception as e:  # noqa: BLE001 - compared
        return ("raises", type(e).__name__)


def outcome(root: Any, error: BaseException | None, rec: list) -> dict[str, Any]:
    """What must not depend on the passes or the batch: error, texts, variables, meta info."""
    variables = root.variables()
    return {
        "error": None if error is None else (type(error).__name__, re.sub(r"\d+", "N", str(error))),
        "text": root.text(),
        "vars": variables,
        "meta": {k: _safe(lambda k=k: _meta(root.get_meta_info(k))) for k in sorted(variables)},
        "branches": [b.text() for b in rec[1:]],
    }


def _failed(got: dict[str, Any]) -> bool:
    """Whether a gen or select failed anywhere in the program (a caught failure shows as
    ``<...Error>`` in the text, see ``run_ops``)."""
    return got["error"] is not None or "Error>" in repr(got) or "'raises'" in repr(got["meta"])


def _within(fn: Any) -> Any:
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.append(fn()), daemon=True)
    worker.start()
    worker.join(HANG_S)
    assert not worker.is_alive(), "the run hung"
    return got[0]


def run_alone(backend: Any, item: tuple, passes: str | None) -> dict[str, Any]:
    ops, arg = item
    rec: list = []

    def go() -> dict[str, Any]:
        try:
            interp.run(ops=ops, arg=arg, rec=rec, backend=backend, passes=passes, temperature=0)
            error = None
        except Exception as e:  # noqa: BLE001 - compared, not swallowed
            error = e
        return outcome(rec[0], error, rec)

    return _within(go)


def run_streamed(backend: Any, item: tuple, passes: str | None) -> tuple[str, dict[str, Any]]:
    """The chunks of ``stream=True`` joined, and the outcome."""
    ops, arg = item
    rec: list = []

    def go() -> tuple[str, dict[str, Any]]:
        st = interp.run(ops=ops, arg=arg, rec=rec, backend=backend, passes=passes, temperature=0, stream=True)
        chunks: list[str] = []
        try:
            chunks.extend(st.text_iter())
        except Exception:  # noqa: BLE001 - a failed program's stream ends with its error
            pass
        return "".join(chunks), outcome(rec[0], st.error(), rec)

    return _within(go)


def run_together(
    backend: Any, items: list, passes: str | None, threads: Any = "auto"
) -> list[dict[str, Any]]:
    recs: list[list] = [[] for _ in items]

    def go() -> list[dict[str, Any]]:
        args = [{"ops": ops, "arg": arg, "rec": rec} for (ops, arg), rec in zip(items, recs)]
        states = interp.run_batch(args, backend=backend, passes=passes, temperature=0, num_threads=threads)
        return [outcome(rec[0], st.error(), rec) for st, rec in zip(states, recs)]

    return _within(go)


def check_case(backend: Any, case: dict[str, Any], stream: bool = False) -> None:
    items = case["items"]
    where = f"seed {case['seed']}: {case!r}"
    alone = []
    for k, item in enumerate(items):
        expected = run_alone(backend, item, "")
        alone.append(expected)
        for passes in [None, *SINGLE_PASSES]:
            got = run_alone(backend, item, passes)
            assert got == expected, (f"program {k}, passes={passes!r} vs passes=''", where, got, expected)
        if stream:
            # a stream adds up to the text; a failed gen keeps what it streamed (and, fused, what its
            # chain streamed after it), so only a program without a failure must match the run
            streamed = [run_streamed(backend, item, passes) for passes in ("", None)]
            for passes, (joined, got) in zip(("", None), streamed):
                assert joined == got["text"], (
                    f"program {k}, passes={passes!r}: stream != text",
                    where,
                    joined,
                    got,
                )
            if not _failed(expected) and not any(_failed(got) for _, got in streamed):
                assert streamed[0][1] == streamed[1][1] == expected, (
                    f"program {k} streamed",
                    where,
                    streamed,
                )
    if len(items) > 1:
        # one thread: the programs run one after another, their segments in other rounds
        for passes, threads in ((None, "auto"), ("", "auto"), (None, 1)):
            together = run_together(backend, items, passes, threads)
            for k, (got, expected) in enumerate(zip(together, alone)):
                what = f"program {k} in run_batch, passes={passes!r}, num_threads={threads!r} vs alone"
                assert got == expected, (what, where, got, expected)


@pytest.fixture(scope="module")
def rt(random_model_dir):
    runtime = llmir.Runtime(str(random_model_dir), device="cpu", kv_memory="64MB")
    yield runtime
    runtime.shutdown()


@pytest.mark.parametrize("chunk", range(4))
def test_program_shapes_agree_across_passes_and_batches(rt, chunk):
    for seed in range(BASE_SEED + chunk, BASE_SEED + N_PROGRAMS, 4):
        check_case(rt, draw_case(seed), stream=seed % 3 == 0)


# --- the same on a backend that prefills shared prefixes itself -------------------------------
class PinLedger:
    """Follows what a backend has pinned (``ChainRequest.pin``) and unpinned, in order."""

    def __init__(self, backend: Any) -> None:
        self.events: list[tuple[str, str]] = []
        self.pinned: dict[str, int] = {}
        self.stray: list[str] = []  # unpinned while not pinned
        lock = threading.Lock()  # the rounds of a batch run on threads of their own
        submit, unpin = backend.submit, backend.unpin

        def on_submit(request: Any, on_chunk: Any = None) -> Any:
            future = submit(request, on_chunk)  # (a refused request raises: never pinned)
            with lock:
                if request.pin:
                    self.pinned[request.prompt] = self.pinned.get(request.prompt, 0) + 1
                self.events.append(("pin" if request.pin else "request", request.prompt))
            return future

        def on_unpin(prompt: str) -> None:
            with lock:
                self.events.append(("unpin", prompt))
                if self.pinned.get(prompt, 0) > 0:
                    self.pinned[prompt] -= 1
                else:
                    self.stray.append(prompt)
            unpin(prompt)

        backend.submit, backend.unpin = on_submit, on_unpin

    def left(self) -> list[str]:
        return [p for p, n in self.pinned.items() if n > 0]


def test_program_shapes_agree_on_a_backend_that_prefills(fake):
    # the fake backend (no model, instant) does not share a prefix within a batch: the evaluator
    # prefills shared prefixes and pins them; it refuses constraints in submit without naming the
    # chain's step, so the constrained gens of these programs fail
    fake.delay = 0.0005  # requests overlap
    ledger = PinLedger(fake)
    for seed in range(BASE_SEED + 1000, BASE_SEED + 1000 + 3 * N_PROGRAMS):
        check_case(fake, draw_case(seed), stream=seed % 5 == 0)
        assert not ledger.left() and not ledger.stray, (seed, ledger.left(), ledger.stray)


# --- regressions ------------------------------------------------------------------------------
SHARED = "You are a careful assistant. Answer in one word.\nQ:"  # prefilled once, then pinned


@llmir.function
def shared_prefix(s, question):
    s += SHARED + question + llmir.gen("a", max_tokens=2)


def test_a_shared_prefix_is_unpinned_after_its_users_not_before_its_prefill(fake):
    # the prefix's direct users are the programs' own text (" one", " two"), which needs no
    # request: the pin must last until the gens after that text are done, and the unpin must never
    # reach the backend before the prefill that pins it (a backend honouring pins kept it forever)
    ledger = PinLedger(fake)
    states = shared_prefix.run_batch([{"question": " one"}, {"question": " two"}], backend=fake)
    assert [st.error() for st in states] == [None, None]
    kinds = [kind for kind, _ in ledger.events]
    assert kinds == ["pin", "request", "request", "unpin"], ledger.events
    assert not ledger.left() and not ledger.stray, ledger.events


@llmir.function
def chain_with_a_refused_gen(s):
    # with the passes on, a -> " then" -> b is one fused chain (one request)
    s += "Q:" + llmir.gen("a", max_tokens=2) + " then" + llmir.gen("b", max_tokens=2, regex="[a-z]+")


def test_a_chain_whose_later_gen_the_backend_refuses_runs_the_gens_before_it(fake):
    # the fake backend refuses a constraint in submit without naming the chain's step (nor does
    # OpenAI's backend for a stop_regex): call by call, gen 'a' runs and 'b' fails; fused, the
    # whole chain failed as 'a', which never ran
    outcomes = []
    for passes in ("", None):
        (st,) = chain_with_a_refused_gen.run_batch([{}], backend=fake, passes=passes)
        outcomes.append((type(st.error()).__name__, str(st.error()), st.text(), st.variables()))
    assert outcomes[0][0] == "GenerationNotSupportedError" and "'b' failed" in outcomes[0][1], outcomes
    assert outcomes[0][3]["a"], outcomes
    assert outcomes[1] == outcomes[0]
