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

This module is the driver (dataflow, pure ops, stopping, results); the model calls are
``segment_calls._SegmentCalls`` and the prefill gates ``prefill._PrefillGates``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, wait
from typing import Any

from llmir_lang.dsl.errors import ProgramInterruptedError
from llmir_lang.dsl.ordering import CallOrder
from llmir_lang.dsl.prefill import PrefillMemory, _PrefillGates
from llmir_lang.dsl.results import Failure, FunctionResult, StateResult, _Val
from llmir_lang.dsl.segment_calls import UNCONDITIONAL_PROMPT, _SegmentCalls
from llmir_lang.executor.backend import Backend
from llmir_lang.ir import Function, Module, Op
from llmir_lang.ir import ops as K

# (function index, indices of the returned states whose chain holds the gen, gen name, new text)
ChunkSink = Callable[[int, frozenset[int], str, str], None]
DoneSink = Callable[[int, FunctionResult], None]


class SegmentEvaluator(_PrefillGates, _SegmentCalls):
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
    # --- stopping ------------------------------------------------------------------------
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


__all__ = ["UNCONDITIONAL_PROMPT", "ChunkSink", "DoneSink", "SegmentEvaluator"]
