"""What the two randomized engine stress tests share (``test_stress_scheduler.py``,
``test_fuzz_pressure.py``): waiting for the jobs' outcomes, the oracle run of one job alone, and a
dump of the engine's queues for a failure message."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from dataclasses import replace
from typing import Any

import pytest

from llmir_lang.executor.engine import Engine
from llmir_lang.executor.sampling_params import SamplingParams

HANG_S = 60.0  # a request still unresolved after this long hangs


def dump(eng: Engine) -> str:
    """The scheduler's queues (rid, tokens, KV), the pool and the cache, read on the engine thread."""

    def state() -> str:
        s = eng.scheduler
        rows = [
            f"{name}: {[(r.rid, r.seq_len, r.kv_len) for r in reqs]}"
            for name, reqs in (
                ("waiting", list(s.waiting)),
                ("running", s.running),
                ("extending", s.extending),
                ("chunked", [s.chunked] if s.chunked else []),
            )
        ]
        return "\n".join(rows + [str(eng.pool), str(eng.cache.stats())])

    try:
        return eng.call_in_engine_thread(state)
    except Exception as e:  # noqa: BLE001 - a dump for a failure message must not raise itself
        return f"(no state: {e})"


def collect(eng: Engine, jobs: Iterable[Any], describe: Callable[[Any], str]) -> None:
    """Wait for each submitted job's future (``job.fut``): ``job.result`` (None where it was
    cancelled) or ``job.error``. One that does not resolve within HANG_S fails the test with
    ``describe(job)`` and the engine's state."""
    for job in jobs:
        if job.fut is None or job.error is not None:
            continue  # never submitted (its submission raised ``job.error``)
        try:
            job.result = job.fut.result(timeout=HANG_S)
        except CancelledError:
            job.result = None
        except TimeoutError:
            pytest.fail(f"{describe(job)} hung\n{dump(eng)}")
        except BaseException as e:  # noqa: BLE001 - the tests check it
            job.error = e


def with_tops(sp: SamplingParams | None) -> SamplingParams:
    """``sp`` with the top-2 logprobs of each token where it is greedy: they tell a near-tie (float
    noise) from a bug where a workload's tokens differ from the alone run's."""
    assert sp is not None
    return replace(sp, return_logprob=True, top_logprobs_num=2) if sp.temperature == 0 else sp


def alone(oracle: Engine, job: Any) -> Any:
    """The oracle's answer to ``job`` (kind ``score``, ``chain`` or a plain generation, with
    ``prompt``, ``conts``, ``params`` and ``steps``) run alone on a flushed cache."""
    oracle.flush_cache()
    if job.kind == "score":
        return oracle.score(job.prompt, job.conts)
    if job.kind == "chain":
        steps = [("gen", with_tops(job.params), None)]
        steps += [s if s[0] == "text" else ("gen", with_tops(s[1]), None) for s in job.steps]
        return oracle.submit_chain(job.prompt, steps).result(timeout=HANG_S)
    return oracle.submit(job.prompt, with_tops(job.params)).result(timeout=HANG_S)
