"""``POST /program``: a whole program as IR text plus its arguments, run in one round trip.

The server parses and verifies the IR, optimizes the whole module with the pass pipeline (so
prefix sharing, fork/join scheduling, select tries and chain fusion see every function at once),
renders roles with the served model's own chat template, and runs it on the embedded engine with
the DSL's segment evaluator. The answer holds, per function, each returned state: its text, its
variables, their meta info, and its failure if a generation failed. The server's
``--reasoning-parser`` plays no part: a gen's output is split, and its constraint starts after the
reasoning, where the program's ``separate_reasoning`` says, as on the embedded engine.

Body: ``{"ir": "<IR text>", "args": {...} | [{...}, ...], "passes": "<pipeline>"}``. Every
function parameter needs a string argument; unknown arguments are an error. Limits: the request
size limit bounds the IR; a gen's explicit ``max_tokens`` is checked against
``--max-tokens-limit`` (400 above it), and a gen without one gets the default capped by it, as
the raw routes do for requests that do not say.

Errors: what is wrong with the request itself (IR text, arguments, pipeline, a max_tokens above
the limit) is a 400 before anything runs; what fails while the program runs (an invalid regex, a
bad sampling value, a generation error) fails that state only and comes back in its ``error``,
as the same program reports it on the embedded engine.

The run is one request to the server: a client that disconnects gets every engine request of it
aborted (``ProgramRun``), and the stats count it once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

from fastapi import APIRouter, Request

from llmir_lang.errors import IRError
from llmir_lang.ir import Module, parse_ir
from llmir_lang.ir import ops as K
from llmir_lang.server.errors import ClientDisconnectedError, ServerHTTPError, blame, shutting_down
from llmir_lang.server.protocol import ProgramRequest
from llmir_lang.server.routes_native import service_of
from llmir_lang.server.service import EngineService, ProgramEngine, ProgramRun

router = APIRouter()

# what a gen without max_tokens generates (SamplingParams' default)
_DEFAULT_GEN_TOKENS = 128


def bind_args(module: Module, args: dict[str, str] | list[dict[str, str]] | None) -> list[dict[str, str]]:
    """One argument dict per function, each naming exactly that function's parameters."""
    fns = module.functions
    if args is None:
        args = [{} for _ in fns]
    elif isinstance(args, dict):
        if len(fns) != 1:
            raise ServerHTTPError(
                400,
                f"the module has {len(fns)} functions; give 'args' as a list of {len(fns)} dicts",
                param="args",
            )
        args = [args]
    if len(args) != len(fns):
        raise ServerHTTPError(
            400,
            f"'args' has {len(args)} entries for {len(fns)} functions; give one per function",
            param="args",
        )
    for fn, given in zip(fns, args):
        params = [p.name for p in fn.params]
        missing = [p for p in params if p not in given]
        unknown = [k for k in given if k not in params]
        if missing or unknown:
            raise ServerHTTPError(
                400,
                f"function @{fn.name} takes parameters {params}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown {unknown}" if unknown else ""),
                param="args",
            )
    return list(args)


def check_limits(module: Module, limit: int | None) -> Module:
    """Every gen (also inside ``gen.chain``) that sets ``max_tokens`` must ask for at most
    ``limit`` tokens; a gen that does not set it gets ``min(default, limit)`` (the module with
    those gens rewritten is returned)."""
    if limit is None:
        return module
    cap = min(_DEFAULT_GEN_TOKENS, limit)

    def capped(fn_name: str, name: Any, attrs: dict[str, Any]) -> dict[str, Any]:
        n = attrs.get("max_tokens")
        if n is None:
            return {**attrs, "max_tokens": cap} if cap < _DEFAULT_GEN_TOKENS else attrs
        if isinstance(n, int) and n > limit:
            raise ServerHTTPError(
                400,
                f"@{fn_name}: gen {name!r} asks for {n} tokens (max_tokens), above this server's limit "
                f"of {limit}; set max_tokens <= {limit}, or leave it out to get {cap}",
                param="ir",
            )
        return attrs

    functions = []
    for fn in module.functions:
        ops = []
        for op in fn.ops:
            if op.kind == K.GEN:
                op = dataclasses.replace(op, attrs=capped(fn.name, op.label, dict(op.attrs)))
            elif op.kind == K.GEN_CHAIN:
                segments = tuple(
                    capped(fn.name, seg.get("gen"), dict(seg)) if "gen" in seg else seg
                    for seg in op.attrs.get("segments", ())  # type: ignore[union-attr]
                )
                op = dataclasses.replace(op, attrs={**op.attrs, "segments": segments})
            ops.append(op)
        functions.append(dataclasses.replace(fn, ops=tuple(ops)))
    return dataclasses.replace(module, functions=tuple(functions))


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def program_backend(svc: EngineService, run: ProgramRun) -> Any:
    """An engine backend whose requests are those of ``run`` (so they can be aborted together),
    sharing the service's constraint compiler."""
    from llmir_lang.executor.backend import EngineBackend

    backend = EngineBackend(ProgramEngine(svc.engine, run))
    backend._compiler = svc.compiler()  # compiled specs are cached across requests
    return backend


def run_program(
    svc: EngineService, backend: Any, module: Module, args: list[dict[str, str]], passes: str | None
) -> dict:
    """Optimize and run ``module`` on ``backend`` (blocking; call it off the event loop)."""
    from llmir_lang.dsl.chat_roles import chat_roles
    from llmir_lang.dsl.evaluator import SegmentEvaluator
    from llmir_lang.optimizer import DEFAULT_PIPELINE, PassManager

    started = time.perf_counter()
    roles = chat_roles(backend) if svc.engine.tokenizer.has_chat_template else None
    pipeline = DEFAULT_PIPELINE if passes is None else passes
    options = (
        {"canonicalize": {"template": roles}} if roles is not None and "canonicalize" in pipeline else {}
    )
    with blame("ir", IRError):  # the module's roles that the chat template cannot render
        optimized = PassManager(pipeline, options).run(module) if pipeline.strip() else module
    ev = SegmentEvaluator(backend, roles)
    results = ev.run(optimized, args)
    functions = []
    for fn, res in zip(module.functions, results):
        states = []
        for st in res.states:
            states.append(
                {
                    "text": st.text,
                    "vars": {k: v.value for k, v in st.vars.items()},
                    "meta": {k: _json_safe(v.meta) for k, v in st.vars.items()},
                    "error": None
                    if st.failure is None
                    else {"var": st.failure.name, "message": st.failure.message},
                }
            )
        functions.append({"name": fn.name, "states": states})
    return {
        "functions": functions,
        "stats": {
            "requests": ev.requests,
            "prefills": ev.prefills,
            "score_calls": ev.score_calls,
            "seconds": round(time.perf_counter() - started, 4),
        },
    }


def _checked_program(
    body: ProgramRequest, max_tokens_limit: int | None
) -> tuple[Module, list[dict[str, str]]]:
    """The request's module, parsed, verified and within the limits, and its bound arguments;
    each problem a typed error (400)."""
    with blame("ir"):
        module = parse_ir(body.ir)  # IRParseError (400) with line and column; verified: IRVerifyError (400)
    if not module.functions:
        raise ServerHTTPError(
            400, "the module has no function; send at least one 'func @name(...) {...}'", param="ir"
        )
    args = bind_args(module, body.args)
    module = check_limits(module, max_tokens_limit)
    if body.passes is not None:
        from llmir_lang.optimizer import parse_pipeline

        with blame("passes"):
            parse_pipeline(body.passes)  # PassPipelineError (400) before anything runs
    return module, args


@router.post("/program")
async def program(body: ProgramRequest, request: Request) -> dict[str, Any]:
    svc = service_of(request)
    svc.check_open()
    # off the event loop: parsing and verifying a large module takes about 1.5 s a MB here, which
    # would stall every other request of the server meanwhile
    module, args = await asyncio.to_thread(_checked_program, body, svc.config.max_tokens_limit)
    run = svc.start_program()
    loop = asyncio.get_running_loop()
    outcome = "failed"
    try:
        fut = loop.run_in_executor(
            svc.programs, run_program, svc, program_backend(svc, run), module, args, body.passes
        )
        try:
            out = await svc.watch(fut, request, "/program")
        except (asyncio.CancelledError, ClientDisconnectedError) as e:
            outcome = "aborted"
            gone = isinstance(e, ClientDisconnectedError)
            svc.cancel_program(run, "the client disconnected" if gone else "the request was cancelled")
            fut.cancel()  # the run ends by itself; nobody reads its outcome
            raise
        if run.cancelled:  # the shutdown aborted it: its states are cut short
            outcome = "aborted"
            raise shutting_down(" and stopped this program before it finished (--shutdown-timeout)")
        outcome = "finished"
        return out
    finally:
        svc.end_program(run, outcome)
