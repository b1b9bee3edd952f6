"""The segment evaluator: runs an (optimized) module on a ``Backend``, every ready chain at once.

Dataflow: an op runs as soon as its operands are known. Pure ops (text, roles, append, fork,
join, var) are computed in Python at once; ``gen`` and ``gen.chain`` become one ``ChainRequest``
each (a chain: several gens and forced text in ONE engine request), ``select`` one ``score`` call
(all choices in one call when the select-trie pass marked it ``score = "batched"``, else one call
per choice). Inside one function calls go one at a time in body order, except on the branches of
the forks the fork-join pass grouped (``ordering``); the calls of all functions that are ready
are submitted together, so the engine batches them.

Optimizer hints (each may be ignored without changing any output; they only save work):

- ``pin = "pN"`` (prefix-share): the first time a state with this pin is known, its text is
  prefilled once (an extend, no generation) and the ops that extend it, in every function, wait
  for that prefill, so they all find it in the radix cache instead of computing it side by side.
  Its users are the model calls (gen, gen.chain, select) whose prompt holds it, wherever they are
  below it: constant text after it needs no request, and unpinning once that text was appended
  (at once) told the backend to unpin the prefix before the prefill had pinned it. After the last
  user finishes, the backend is told to ``unpin`` it.
- ``group = "gN"`` on a fork (fork-join): the same for the forked state when it carries no pin:
  prefill once, then start the heads of all branches together.

A prefix less than ``MIN_PREFILL_CHARS`` longer than the enclosing prefill is not prefilled on its
own (its users still wait for the enclosing one): a request costs more than a few tokens.

Failures never raise out of ``run``: a failed request marks its op's state failed, every state
after it inherits the failure, and the function's result reports it per returned state.

``cancel(reason)`` (from another thread) stops a run: the requests in flight are aborted (the
backend's optional ``abort_requests(futures)``, then ``Future.cancel``), their ops and every op
not started yet fail with a ``ProgramInterruptedError``, and ``run`` returns at once. A
``KeyboardInterrupt`` in the thread that waits in ``run`` aborts the requests in flight too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, wait
from dataclasses import dataclass
from typing import Any

from llmir_lang.dsl.errors import ProgramInterruptedError
from llmir_lang.dsl.lowering import (
    chain_steps,
    gen_step,
    missing_next_alternatives,
    pick_choice,
    prefill_request,
    select_meta,
    step_meta,
    unfinished_value,
)
from llmir_lang.dsl.ordering import CallOrder
from llmir_lang.dsl.prefill import MIN_PREFILL_CHARS, PrefillMemory
from llmir_lang.dsl.results import Failure, FunctionResult, StateResult, VarResult
from llmir_lang.errors import ConstraintViolationError, NotYetSupportedError
from llmir_lang.executor.backend import Backend, ChainRequest, ChainResult, score_pool
from llmir_lang.ir import Function, Module, Op
from llmir_lang.ir import ops as K


@dataclass(slots=True)
class _Val:
    text: str
    vars: dict[str, VarResult]
    failure: Failure | None = None
    gates: frozenset[str] = frozenset()  # prefills this state's users must wait for


# (function index, indices of the returned states whose chain holds the gen, gen name, new text)
ChunkSink = Callable[[int, frozenset[int], str, str], None]
DoneSink = Callable[[int, FunctionResult], None]


@dataclass(frozen=True, slots=True)
class _Picked:
    """A select scored and picked on the score pool (a backend's scores are plain lists)."""

    index: int
    lps: list[list[float]]


def _choices_method(op: Op) -> str:
    return str(op.attrs.get("choices_method", "token_length_normalized"))


# what ``unconditional_likelihood_normalized`` scores the choices after instead of the prompt
UNCONDITIONAL_PROMPT = "\n"


class SegmentEvaluator:
    """Evaluates one module on ``backend``. ``roles`` renders role markers the passes left as
    ops (the call-by-call pipeline keeps them); ``on_chunk`` receives streamed gen text;
    ``on_function_done`` is called as soon as each function is complete (before ``run`` returns)."""

    def __init__(
        self,
        backend: Backend,
        roles: Any = None,
        *,
        on_chunk: ChunkSink | None = None,
        on_function_done: DoneSink | None = None,
        prefilled: PrefillMemory | None = None,
    ) -> None:
        self.backend = backend
        self.prefilled = prefilled if prefilled is not None else PrefillMemory()
        self.roles = roles
        self.on_chunk = on_chunk
        self.on_function_done = on_function_done
        self.prefills = 0  # prefill-only requests sent (for tests and stats)
        self.requests = 0  # gen / chain requests sent
        self.score_calls = 0
        self._tokens_cache: dict[str, list[tuple[int, str | None]] | None] = {}  # select meta info
        # the backend computes a prefix shared by requests submitted together once by itself:
        # a separate prefill would only add a round trip before the users may start
        self._shares_in_batch = bool(getattr(backend, "shares_prefix_in_batch", False))
        self._stop: Future = Future()  # resolved with the reason by ``cancel``

    def cancel(self, reason: str) -> None:
        """Stop ``run`` (see the module docstring); thread-safe, and a no-op after the first."""
        try:
            self._stop.set_result(reason)
        except InvalidStateError:
            pass

    # --- driver --------------------------------------------------------------------------
    def run(self, module: Module, args: Sequence[Mapping[str, str]] | None = None) -> list[FunctionResult]:
        fns = module.functions
        self._fns = fns
        self._vals: list[dict[str, _Val]] = [{} for _ in fns]
        for fi, fn in enumerate(fns):
            bound = args[fi] if args is not None else {}
            for p in fn.params:
                self._vals[fi][p.name] = _Val(bound.get(p.name, ""), {})
        self._todo: list[list[int]] = [list(range(len(fn.ops))) for fn in fns]
        self._started: set[tuple[int, int]] = set()
        self._order = [CallOrder(fn) for fn in fns]
        self._inflight: dict[Future, tuple[int, int]] = {}
        # a chain submitted without its gens from this one on: (that gen's index, its error)
        self._chain_failures: dict[tuple[int, int], tuple[int, BaseException]] = {}
        self._gate_future: dict[str, Future | None] = {}  # None: ready
        self._gate_text: dict[str, str] = {}  # prefilled (pinned) and not yet unpinned
        self._gate_len: dict[str, int] = {}
        self._gate_users: dict[str, int] = {}
        self._prefill_waiting: list[tuple[str, _Val, frozenset[str]]] = []
        # op index -> the gates of a call's prompt (whose users it is), per function
        self._call_gates: list[dict[int, frozenset[str]]] = [{} for _ in fns]
        self._direct_gates = [self._plan_gates(fi, fn) for fi, fn in enumerate(fns)]
        self._chains = [self._chains_of(fn) if self.on_chunk else {} for fn in fns]
        self._results: list[FunctionResult | None] = [None] * len(fns)
        try:
            while True:
                progressed = self._scan()
                if all(r is not None for r in self._results):
                    break
                if progressed:
                    continue
                if not self._inflight:
                    raise RuntimeError("segment evaluator stalled with no request in flight (a bug)")
                done, _ = wait([*self._inflight, self._stop], return_when=FIRST_COMPLETED)
                if self._stop.done():
                    self._stop_inflight()
                    continue
                for fut in done:
                    self._complete(fut)
        except BaseException:
            # a KeyboardInterrupt in the waiting thread (a notebook's interrupt during ``run``):
            # the engine must not go on generating what nobody will read
            self._abort(list(self._inflight))
            raise
        for gate, users in self._gate_users.items():
            if users > 0 and gate in self._gate_text:
                self._unpin(gate)
        return [r for r in self._results if r is not None]

    def _scan(self) -> bool:
        progressed = False
        stopped = self._stop.done()
        if stopped:  # a stopped run starts nothing, prefills included
            for gate, _, _ in self._prefill_waiting:
                self._gate_future[gate] = None  # never pinned: nothing to unpin
            self._prefill_waiting.clear()
        for gate, val, ancestors in list(self._prefill_waiting):
            if self._gates_ready(ancestors):
                self._prefill_waiting.remove((gate, val, ancestors))
                self._start_prefill(gate, val.text)
                progressed = True
        for fi, fn in enumerate(self._fns):
            if self._results[fi] is not None:
                continue
            vals = self._vals[fi]
            for i in list(self._todo[fi]):
                op = fn.ops[i]
                if (fi, i) in self._started or any(v.name not in vals for v in op.operands):
                    continue
                if op.kind in (K.GEN, K.GEN_CHAIN, K.SELECT):
                    base = vals[op.state.name]
                    if base.failure is not None:
                        self._resolve(fi, i, _Val(base.text, base.vars, base.failure, base.gates))
                    elif stopped:
                        self._resolve(fi, i, _Val(base.text, base.vars, self._stopped(op), base.gates))
                    elif self._order[fi].may_start(i) and self._gates_ready(base.gates):
                        self._start(fi, i, op, base)
                    else:
                        continue
                else:
                    self._resolve(fi, i, self._pure(fi, op))
                progressed = True
            if not self._todo[fi]:
                self._finish_function(fi)
                progressed = True
        return progressed

    # --- pure ops ------------------------------------------------------------------------
    def _pure(self, fi: int, op: Op) -> _Val | None:
        vals = self._vals[fi]
        if op.kind == K.START:
            return _Val("", {})
        if op.kind == K.RETURN:
            return None
        base = vals[op.state.name]
        if op.kind == K.VAR:
            var = base.vars.get(op.label or "")
            return _Val(var.value if var is not None else "", {}, base.failure)
        if op.kind == K.FORK:
            return base
        if op.kind == K.JOIN:
            branches = [vals[b.name] for b in op.operands[1:]]
            failure = base.failure or next((b.failure for b in branches if b.failure), None)
            text = base.text
            if op.attrs.get("mode") == "concat":
                text += "".join(b.text[len(base.text) :] for b in branches)
            return _Val(text, base.vars, failure, base.gates)
        if op.kind == K.TEXT:
            return _Val(base.text + (op.label or ""), base.vars, base.failure, base.gates)
        if op.kind == K.APPEND:
            return _Val(base.text + vals[op.operands[1].name].text, base.vars, base.failure, base.gates)
        if op.kind in (K.ROLE_BEGIN, K.ROLE_END):
            if self.roles is None:
                fail = Failure(None, f"role {op.label!r} needs the model's chat template, and none is set")
                return _Val(base.text, base.vars, base.failure or fail, base.gates)
            marker = self.roles.begin(op.label) if op.kind == K.ROLE_BEGIN else self.roles.end(op.label)
            return _Val(base.text + marker, base.vars, base.failure, base.gates)
        raise RuntimeError(f"the segment evaluator has no rule for op kind {op.kind!r}")

    def _resolve(self, fi: int, i: int, val: _Val | None) -> None:
        op = self._fns[fi].ops[i]
        self._todo[fi].remove(i)
        self._order[fi].finish(i)
        for gate in self._call_gates[fi].get(i, ()):  # a call is done (or never ran)
            self._gate_users[gate] -= 1
            if self._gate_users[gate] == 0 and gate in self._gate_text:
                self._unpin(gate)
        if val is None:
            return
        for r in op.results:
            own = self._direct_gates[fi].get(r.name, ())
            gates = val.gates | frozenset(own) if own else val.gates
            self._vals[fi][r.name] = _Val(val.text, val.vars, val.failure, gates)
            for gate in own:
                if gate not in self._gate_future:
                    self._open_gate(gate, val)

    # --- prefill gates -------------------------------------------------------------------
    def _plan_gates(self, fi: int, fn: Function) -> dict[str, tuple[str, ...]]:
        """State name -> gate ids attached to it. Counts each gate's users: the calls whose
        prompt holds the gated state (the gates a state carries, as ``_Val.gates`` at run time)."""
        direct: dict[str, list[str]] = {}
        carried: dict[str, frozenset[str]] = {}
        for i, op in enumerate(fn.ops):
            pin = op.attrs.get("pin")
            if isinstance(pin, str) and op.results:
                direct.setdefault(op.result.name, []).append(pin)
            if op.kind == K.FORK:
                inherited = direct.get(op.state.name, [])
                group = op.attrs.get("group")
                extra = [f"fork:{fi}:{group}"] if isinstance(group, str) and not inherited else []
                for r in op.results:
                    direct[r.name] = [*inherited, *extra]
            base = carried.get(op.operands[0].name, frozenset()) if op.operands else frozenset()
            if op.kind in (K.GEN, K.GEN_CHAIN, K.SELECT) and base:
                self._call_gates[fi][i] = base
                for gate in base:
                    self._gate_users[gate] = self._gate_users.get(gate, 0) + 1
            if op.kind not in (K.VAR, K.RETURN):
                for r in op.results:
                    carried[r.name] = base | frozenset(direct.get(r.name, ()))
        return {k: tuple(v) for k, v in direct.items()}

    def _open_gate(self, gate: str, val: _Val) -> None:
        covered = max((self._gate_len.get(g, 0) for g in val.gates if g != gate), default=0)
        covered = max(covered, self.prefilled.covered(val.text))
        self._gate_len[gate] = len(val.text)
        if (
            val.failure is not None
            or self._shares_in_batch
            or len(val.text) - covered < MIN_PREFILL_CHARS
            or self._gate_users.get(gate, 0) <= 0
        ):
            self._gate_future[gate] = None
            return
        self._gate_future[gate] = Future()  # placeholder until the prefill is submitted
        self._prefill_waiting.append((gate, val, val.gates - {gate}))

    def _start_prefill(self, gate: str, text: str) -> None:
        if self._gate_users.get(gate, 0) <= 0:  # its users are done already (they failed)
            self._gate_future[gate] = None
            return
        try:
            fut = self.backend.submit(prefill_request(text))
        except Exception:  # a prefill is only a hint; its users report any real problem
            self._gate_future[gate] = None
            return
        self._gate_text[gate] = text  # pinned now: unpinned after its last user
        self.prefills += 1
        self.prefilled.add(text)
        self._gate_future[gate] = fut
        self._inflight[fut] = (-1, -1)

    def _gates_ready(self, gates: frozenset[str]) -> bool:
        for gate in gates:
            fut = self._gate_future.get(gate)
            if fut is not None and not (fut.done() and fut not in self._inflight):
                return False
        return True

    def _unpin(self, gate: str) -> None:
        text = self._gate_text.pop(gate)
        try:
            self.backend.unpin(text)
        except Exception:  # unpinning is a hint too
            pass

    # --- requests ------------------------------------------------------------------------
    def _start(self, fi: int, i: int, op: Op, base: _Val) -> None:
        try:
            if op.kind == K.SELECT:
                choices = [str(c) for c in op.attrs["choices"]]  # type: ignore[union-attr]
                batched = op.attrs.get("score") == "batched"
                fut = self._score_start(base.text, choices, batched, _choices_method(op))
                self.score_calls += 1 if batched else len(choices)
            elif op.kind == K.GEN:
                fut = self._submit(fi, i, base.text, [gen_step(op.label, op.attrs)])
            else:
                segments = list(op.attrs["segments"])  # type: ignore[arg-type]
                try:
                    fut = self._submit(fi, i, base.text, chain_steps(segments))
                except Exception as e:
                    fut = self._submit_before_bad_gen(fi, i, base.text, segments, e)
        except Exception as e:  # bad input: fails this op before any model step
            self._resolve(fi, i, _Val(base.text, base.vars, _failure(op, e), base.gates))
            return
        self._started.add((fi, i))
        self._inflight[fut] = (fi, i)

    def _submit(self, fi: int, i: int, prompt: str, steps: list) -> Future:
        names = [s.name or "" for s in steps if not isinstance(s, str)]
        fut = self.backend.submit(ChainRequest(prompt, steps), on_chunk=self._chunk_sink(fi, i, names))
        self.requests += 1
        return fut

    def _submit_before_bad_gen(
        self, fi: int, i: int, prompt: str, segments: list, error: BaseException
    ) -> Future:
        """A fused chain that could not be submitted: one of its gens is bad. The gens before it
        still run (as call by call would run them), and the error is that gen's, not the chain's
        first: submit the longest part of the chain that ends before it. ``EngineBackend`` names
        the gen (``chain_step``); another backend may refuse a gen in ``submit`` without saying
        which (OpenAI's a ``stop_regex``), and a refused submit runs nothing (``Backend.submit``),
        so shorter parts are tried until one is taken, each refusal naming an earlier gen."""
        gens = [k for k, seg in enumerate(segments) if "text" not in seg]
        named = _bad_gen(segments, error)
        for bad in [named] if named is not None else range(len(gens) - 1, 0, -1):
            if bad <= 0:
                break
            try:
                fut = self._submit(fi, i, prompt, chain_steps(segments[: gens[bad - 1] + 1]))
            except Exception as e:  # a gen before ``bad`` is refused too (the first is ``e``'s)
                error = e
                continue
            self._chain_failures[(fi, i)] = (bad, error)
            return fut
        raise error

    def _score_start(self, prompt: str, choices: list[str], batched: bool, method: str) -> Future:
        """A future of the select's scores. One batched call is started without a waiting thread
        (``Backend.score_async``): its future holds each choice's token logprobs, and the choice
        is picked in ``_complete``, off the engine thread. The others (a choice per call, or two
        calls for the unconditional method) run on the score pool and resolve to ``_Picked``."""
        if not batched or method == "unconditional_likelihood_normalized":
            return score_pool().submit(self._score, prompt, choices, batched, method)
        try:
            return self.backend.score_async(prompt, choices)
        except Exception as e:  # bad input: fails this select as a failing score call would
            failed: Future = Future()
            failed.set_exception(e)
            return failed

    def _score(self, prompt: str, choices: list[str], batched: bool, method: str) -> _Picked:
        if batched:
            lps = self.backend.score(prompt, choices)
        else:
            lps = [self.backend.score(prompt, [c])[0] for c in choices]
        unconditional = None
        if method == "unconditional_likelihood_normalized":
            # the same choice tokens scored after a context-free start (a newline)
            unconditional = self.backend.score(UNCONDITIONAL_PROMPT, choices)
        return _Picked(pick_choice(method, lps, unconditional), lps)

    def _chunk_sink(self, fi: int, i: int, names: list[str]) -> Callable[[int, str], None] | None:
        if self.on_chunk is None:
            return None
        sink, owners = self.on_chunk, self._chains[fi].get(i, frozenset())

        last = [-1]

        def on_chunk(index: int, text: str) -> None:
            if 0 <= index < len(names):
                # gens of the chain that streamed nothing are finished too: say so (an empty
                # chunk), so a state's stream does not wait on them until the segment ends
                for j in range(last[0] + 1, index):
                    sink(fi, owners, names[j], "")
                last[0] = max(last[0], index)
                sink(fi, owners, names[index], text)

        return on_chunk

    def _stopped(self, op: Op) -> Failure:
        reason = str(self._stop.result())
        names = op.defined_names()
        return Failure(names[0] if names else op.label, reason, ProgramInterruptedError(reason))

    def _stop_inflight(self) -> None:
        """After ``cancel``: abort every request in flight and fail its op."""
        futures = list(self._inflight)
        self._abort(futures)
        for fut in futures:
            fi, i = self._inflight.pop(fut)
            if fi < 0:
                continue  # a prefill: nothing starts after a stop, so nothing waits for it
            op = self._fns[fi].ops[i]
            base = self._vals[fi][op.state.name]
            self._started.discard((fi, i))
            self._resolve(fi, i, _Val(base.text, base.vars, self._stopped(op), base.gates))

    def _choice_tokens(self, choice: str) -> list[tuple[int, str | None]] | None:
        """A select choice's ``(token id, text)`` pairs for its meta info, or None where the
        backend cannot tokenize (cached: programs reuse their choices)."""
        if choice not in self._tokens_cache:
            tokenize = getattr(self.backend, "token_ids", None)
            decode = getattr(self.backend, "token_text", None)
            ids = tokenize(choice) if callable(tokenize) else None
            self._tokens_cache[choice] = (
                None if ids is None else [(t, decode(t) if callable(decode) else None) for t in ids]
            )
        return self._tokens_cache[choice]

    def _token_text(self, attrs: Mapping[str, Any]) -> Callable[[int], str | None] | None:
        """How a gen's logprob triples get their token text: with ``return_text_in_logprobs``."""
        decode = getattr(self.backend, "token_text", None)
        return decode if attrs.get("return_text_in_logprobs") and callable(decode) else None

    def _abort(self, futures: list[Future]) -> None:
        """Abort the requests behind ``futures``: the backend stops generating them (where it
        can: ``abort_requests``), and a future not started yet (a select's scoring) never runs."""
        abort = getattr(self.backend, "abort_requests", None)
        if callable(abort) and futures:
            try:
                abort(futures)
            except Exception:  # aborting is best effort: the run stops either way
                pass
        for fut in futures:
            fut.cancel()

    def _complete(self, fut: Future) -> None:
        fi, i = self._inflight.pop(fut)
        if fi < 0:
            return  # a prefill finished; its gate opens on the next scan
        op = self._fns[fi].ops[i]
        base = self._vals[fi][op.state.name]
        self._started.discard((fi, i))
        try:
            result = fut.result()
        except Exception as e:
            self._resolve(fi, i, _Val(base.text, base.vars, _failure(op, e), base.gates))
            return
        vars_ = dict(base.vars)
        text = base.text
        if op.kind == K.SELECT:
            choices = [str(c) for c in op.attrs["choices"]]  # type: ignore[union-attr]
            if isinstance(result, _Picked):  # picked on the score pool
                picked, lps = result.index, result.lps
            else:  # score_async's logprobs: picked here
                lps = result
                try:
                    picked = pick_choice(_choices_method(op), lps, None)
                except Exception as e:
                    self._resolve(fi, i, _Val(base.text, base.vars, _failure(op, e), base.gates))
                    return
            meta = select_meta(choices, lps, picked, [self._choice_tokens(c) for c in choices])
            vars_[op.label or ""] = VarResult(choices[picked], meta)
            if self.on_chunk is not None:  # streamed states show the choice now, not at the end
                self.on_chunk(fi, self._chains[fi].get(i, frozenset()), op.label or "", choices[picked])
            self.prefilled.add(text + choices[picked])  # scoring left it in the cache
            self._resolve(fi, i, _Val(text + choices[picked], vars_, None, base.gates))
            return
        assert isinstance(result, ChainResult)
        segments = [{"gen": op.label, **op.attrs}] if op.kind == K.GEN else list(op.attrs["segments"])  # type: ignore[arg-type]
        gen_index = 0
        for seg in segments:
            if "text" in seg:
                text += str(seg["text"])
                continue
            name = str(seg["gen"])
            step = result.steps[gen_index] if gen_index < len(result.steps) else None
            cut = self._chain_failures.get((fi, i))
            if cut is not None and gen_index == cut[0]:
                error = cut[1]
                self._resolve(
                    fi,
                    i,
                    _Val(text, vars_, Failure(name, f"{type(error).__name__}: {error}", error), base.gates),
                )
                return
            gen_index += 1
            if step is None or step.error:
                message = (step.error if step else None) or result.error or "the backend returned no result"
                cause = result.exception if step is None else None  # the chain's own failure
                self._resolve(fi, i, _Val(text, vars_, Failure(name, message, cause), base.gates))
                return
            bad = (
                unfinished_value(name, seg, step.text, step.matched_stop)
                if step.finish_reason == "stop"
                else None
            )
            if bad is not None:  # a constrained value cut by a stop (or let through): fail, never pass it on
                self._resolve(
                    fi, i, _Val(text, vars_, Failure(name, bad, ConstraintViolationError(bad)), base.gates)
                )
                return
            missing = missing_next_alternatives(
                name, seg, step, f"the backend ({type(self.backend).__name__})"
            )
            if missing is not None:  # asked-for meta info the backend did not give: fail, never leave it out
                failure = Failure(name, missing, NotYetSupportedError(missing))
                self._resolve(fi, i, _Val(text, vars_, failure, base.gates))
                return
            vars_[name] = VarResult(step.text, step_meta(step, self._token_text(seg), seg))
            text += step.text
            if self.on_chunk is not None:  # the gen is finished (an empty chunk if it said nothing)
                self.on_chunk(fi, self._chains[fi].get(i, frozenset()), name, "")
        self.prefilled.add(text)  # a finished request leaves its prompt and output in the cache
        self._resolve(fi, i, _Val(text, vars_, None, base.gates))

    # --- results -------------------------------------------------------------------------
    def _finish_function(self, fi: int) -> None:
        fn = self._fns[fi]
        ret = fn.ops[-1]
        states = []
        for v in ret.operands:
            val = self._vals[fi][v.name]
            states.append(StateResult(val.text, dict(val.vars), val.failure))
        result = FunctionResult(states)
        self._results[fi] = result
        if self.on_function_done is not None:
            self.on_function_done(fi, result)

    @staticmethod
    def _chains_of(fn: Function) -> dict[int, frozenset[int]]:
        """Op index -> indices of the returned states whose chain (back through operand 0 and
        forks) holds the op: whose streamed text a gen's chunks belong to."""
        defining = {v.name: (i, op) for i, op in enumerate(fn.ops) for v in op.results}
        owners: dict[int, set[int]] = {}
        for r, v in enumerate(fn.ops[-1].operands):
            name: str | None = v.name
            while name is not None and name in defining:
                i, op = defining[name]
                owners.setdefault(i, set()).add(r)
                name = op.operands[0].name if op.operands else None
        return {i: frozenset(rs) for i, rs in owners.items()}


def _bad_gen(segments: Sequence[Mapping[str, Any]], error: BaseException) -> int | None:
    """Which gen of a chain (0-based, among its gens) ``error`` belongs to: the backend names it
    (``chain_step``, set by ``EngineBackend.submit``), or building that gen's step raises alone."""
    named = getattr(error, "chain_step", None)
    if isinstance(named, int):
        return named
    gens = [seg for seg in segments if "text" not in seg]
    for k, seg in enumerate(gens):
        try:
            gen_step(str(seg["gen"]), {key: v for key, v in seg.items() if key != "gen"})
        except Exception:
            return k
    return None


def _failure(op: Op, error: BaseException) -> Failure:
    names = op.defined_names()
    return Failure(names[0] if names else op.label, f"{type(error).__name__}: {error}", error)
