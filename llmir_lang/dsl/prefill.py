"""Prefill bookkeeping: which prefixes are already in the backend's cache, and when a shared
prefix is worth a prefill request of its own (``_PrefillGates``: the optimizer's ``pin`` /
``group`` hints as gates that a prefix's model calls wait for, see ``evaluator``)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

from llmir_lang.dsl.lowering import prefill_request
from llmir_lang.dsl.results import _Val
from llmir_lang.executor.backend import Backend
from llmir_lang.ir import Function
from llmir_lang.ir import ops as K

# A prefill is a request of its own; for a prefix this much longer than what an enclosing prefill
# already covers, computing it once beats computing it in every user side by side.
MIN_PREFILL_CHARS = 32


class PrefillMemory:
    """Texts recently put in the backend's cache (prefills, and the full text of every finished
    request), shared by the rounds of one run, so that a prefix already cached is not prefilled
    again. Bounded; a hint only."""

    def __init__(self, size: int = 256) -> None:
        self._texts: list[str] = []
        self._size = size
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        with self._lock:
            self._texts.append(text)
            del self._texts[: -self._size]

    def covered(self, text: str) -> int:
        """The length of the longest remembered prefix of ``text`` (0 if none)."""
        with self._lock:
            return max((len(t) for t in self._texts if text.startswith(t)), default=0)


class _PrefillGates:
    """The prefill half of ``SegmentEvaluator``: a gate per pinned prefix (or grouped fork), its
    prefill request, its users (the model calls whose prompt holds it) and its unpin after the
    last of them. Needs of the evaluator: ``backend`` and the gate bookkeeping ``run`` sets up."""

    backend: Backend
    prefilled: PrefillMemory
    prefills: int
    _shares_in_batch: bool
    _inflight: dict[Future, tuple[int, int]]
    _gate_future: dict[str, Future | None]
    _gate_text: dict[str, str]
    _gate_len: dict[str, int]
    _gate_users: dict[str, int]
    _prefill_waiting: list[tuple[str, _Val, frozenset[str]]]
    _call_gates: list[dict[int, frozenset[str]]]

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
