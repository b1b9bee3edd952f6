"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Structured output: ``response_format`` (``json_object`` / ``json_schema``) and vLLM's guided
decoding fields (``guided_regex``, ``guided_json``, ``guided_grammar``, ``guided_choice``), at most
one per request. Streaming is server-sent events of ``*.chunk`` objects ended by ``data: [DONE]``;
``stream_options.include_usage`` adds a last chunk with the token counts (``stream_options``
without ``stream=true`` is a 400, as on OpenAI); with ``logprobs`` each chunk carries its tokens'
logprobs in the same format as a plain answer. A stream the server's shutdown aborts ends with its
``abort`` chunk, then an ``{"error": ...}`` event (type ``server_shutting_down``). ``temperature``
must be in OpenAI's [0, 2] here (``/generate`` takes any value >= 0), ``top_p`` in [0, 1] (0: the
most likely token only; ``/generate`` takes (0, 1]), and ``top_logprobs`` / completions'
``logprobs`` in [0, 20]. Chat takes ``max_completion_tokens`` (OpenAI's current name) and
``max_tokens``: the first wins when both are given, and each one given must be valid. Completions
accept ``echo`` with ``logprobs`` (also with ``max_tokens=0``), which is how clients score a text;
the prompt may be token ids (one list, or a list of lists), so a client can score exact token
sequences. Features that are not implemented (``n`` > 1, ``best_of``, ``suffix``, ``tools``,
``logit_bias``, image parts) are a 501 that names them. With ``--reasoning-parser``, chat answers
carry the reasoning apart (``reasoning_content``; ``reasoning_stream.py``), and a constraint
covers what follows the reasoning, as SGLang gates it: a chat request's where it is split, a
completion's always (it never splits; its ``reasoning_parser``, llmir's, chooses another format
or none: ``constraint_gate.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.server.constraint_gate import gated, request_parser
from llmir_lang.server.convert import (
    EventStream,
    constraint_spec,
    prime,
    sampling_params,
    stop_list,
)
from llmir_lang.server.errors import ServerHTTPError, blame, error_body, not_implemented
from llmir_lang.server.openai_logprobs import StreamLogprobs, chat_logprobs, completion_logprobs
from llmir_lang.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _OpenAIBase,
    check_openai_features,
    check_stop_token_ids,
)
from llmir_lang.server.reasoning_stream import ChatDeltas, chat_message, chat_reasoning
from llmir_lang.server.routes_native import render_chat, service_of
from llmir_lang.server.service import EngineService, Submission

router = APIRouter(prefix="/v1")


def _check_model(svc: EngineService, model: str) -> None:
    svc.check_model(model)


def _model_card(svc: EngineService) -> dict[str, Any]:
    return {
        "id": svc.model_name,
        "object": "model",
        "created": int(svc.counters.started_at),
        "owned_by": "llmir",
        "root": str(svc.engine.model_path),
        "max_model_len": svc.engine.config.context_len,
        "llmir": {"features": ["program", "score", "apply_chat_template"]},
    }


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(service_of(request))]}


@router.get("/models/{model:path}")
async def model(model: str, request: Request) -> dict[str, Any]:
    """One model (``client.models.retrieve(name)``); 404 ``model_not_found`` for another name."""
    svc = service_of(request)
    _check_model(svc, model)
    return _model_card(svc)


def _spec(body: _OpenAIBase) -> tuple[Any, str | None]:
    """The request's constraint spec and the field it came from (see ``constraint_spec``).

    vLLM's guided_* fields and SGLang's regex / ebnf (/ json_schema on completions) are the same
    constraints under two names, and ``response_format`` is one more: at most one of all of them.
    Of two that conflict, the error names the later in this order: vLLM's name, SGLang's name,
    ``response_format``."""
    sgl_schema = body.json_schema if isinstance(body, CompletionRequest) else None
    kinds = [
        ("regex", body.guided_regex, "guided_regex", body.regex, "regex"),
        ("json_schema", body.guided_json, "guided_json", sgl_schema, "json_schema"),
        ("grammar", body.guided_grammar, "guided_grammar", body.ebnf, "ebnf"),
    ]
    given: list[tuple[str, Any, str]] = []
    for kind, vllm_value, vllm_name, sgl_value, sgl_name in kinds:
        if vllm_value is not None and sgl_value is not None:
            raise ServerHTTPError(
                400,
                f"{vllm_name} and {sgl_name} are the same constraint under vLLM's and SGLang's names; "
                "give one of them, not both",
                param=sgl_name,
            )
        given.append((kind, vllm_value, vllm_name) if vllm_value is not None else (kind, sgl_value, sgl_name))
    given.append(("choices", body.guided_choice, "guided_choice"))
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        guided = [name for _, value, name in given if value is not None]
        if guided:
            raise ServerHTTPError(
                400,
                f"{guided[0]} and response_format both constrain the output; give one of them, not "
                f"both (drop response_format, or {guided[0]})",
                param="response_format",
            )
        if fmt.type == "json_object":
            return constraint_spec([("json_schema", {"type": "object"}, "response_format")])
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            missing = "response_format.json_schema" + (".schema" if fmt.json_schema is not None else "")
            raise ServerHTTPError(
                400,
                "response_format type 'json_schema' needs json_schema.schema (a JSON Schema): send "
                '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}',
                param=missing,
            )
        return constraint_spec([("json_schema", fmt.json_schema.schema_, "response_format")])
    return constraint_spec(given)


def _params(
    svc: EngineService, body: _OpenAIBase, max_tokens: int, logprobs: int | None, logprobs_field: str
) -> SamplingParams:
    """``logprobs_field``: the field ``logprobs`` (the number of top alternatives) came from."""
    if body.logit_bias:
        raise not_implemented(
            "logit_bias", "remove it (guided_choice or guided_regex can restrict the output)", "logit_bias"
        )
    top_p, top_k = body.top_p, body.top_k
    if top_p == 0:
        # OpenAI takes top_p 0: a nucleus of no mass, the most likely token alone (ties kept, as
        # the engine's top-p keeps them), which is top-k 1 whatever top_k says; the engine's top_p
        # must be > 0. Logprobs are the model's, before either filter, so they do not change.
        top_p, top_k = 1.0, 1
    return sampling_params(
        [
            ("max_new_tokens", max_tokens, _max_tokens_field(body)),
            ("min_new_tokens", min(body.min_tokens, max_tokens), "min_tokens"),
            ("temperature", body.temperature, "temperature"),
            ("top_p", top_p, "top_p"),
            ("top_k", top_k, "top_k"),
            ("min_p", body.min_p, "min_p"),
            ("frequency_penalty", body.frequency_penalty, "frequency_penalty"),
            ("presence_penalty", body.presence_penalty, "presence_penalty"),
            ("repetition_penalty", body.repetition_penalty, "repetition_penalty"),
            ("seed", body.seed, "seed"),
            ("stop", stop_list(body.stop), "stop"),
            ("stop_regex", stop_list(body.stop_regex), "stop_regex"),
            (
                "stop_token_ids",
                check_stop_token_ids(body.stop_token_ids, svc.engine.config.vocab_size, "stop_token_ids"),
                "stop_token_ids",
            ),
            ("ignore_eos", body.ignore_eos, "ignore_eos"),
            ("skip_special_tokens", body.skip_special_tokens, "skip_special_tokens"),
            ("return_logprob", logprobs is not None, "logprobs"),
            ("top_logprobs_num", logprobs or 0, logprobs_field),
        ]
    )


def _chat_max_tokens(svc: EngineService, body: ChatCompletionRequest) -> int:
    """The chat request's token budget. ``max_completion_tokens`` (OpenAI's current name) wins
    over ``max_tokens`` (its deprecated one) when both are given, as on OpenAI, vLLM and SGLang;
    each one given is checked (>= 0, within the server's limit), so a bad ``max_tokens`` next to
    a good ``max_completion_tokens`` is a 400 naming it, not silently ignored."""
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        svc.max_tokens(body.max_tokens, field="max_tokens")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return svc.max_tokens(requested, field=_max_tokens_field(body))


def _max_tokens_field(body: _OpenAIBase) -> str:
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def _abort_error(res: GenerateResult) -> dict[str, Any] | None:
    """The event after the ``abort`` chunk of a stream the server's shutdown stopped: the error
    shape of every other failure (the OpenAI clients raise it), saying why and to send it again."""
    if res.finish_reason == "abort" and res.error:
        return error_body(res.error, "server_shutting_down")
    return None


def _usage(results: list[GenerateResult]) -> dict[str, Any]:
    """OpenAI's usage, with ``prompt_tokens_details.cached_tokens`` (served by the radix cache)."""
    p, c = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
    cached = {"cached_tokens": sum(r.cached_tokens for r in results)}
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": cached,
    }


def _stop_fields(res: GenerateResult) -> dict[str, Any]:
    """What ended a ``"stop"`` (the stop string, the stop regex's pattern or the token id; None
    otherwise) under vLLM's name (``stop_reason``) and SGLang's (``matched_stop``), as ``/generate``
    gives it in ``finish_reason.matched``."""
    matched = res.matched_stop if res.finish_reason == "stop" else None
    return {"stop_reason": matched, "matched_stop": matched}


# --- completions -------------------------------------------------------------------------
@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    svc = service_of(request)
    _check_model(svc, body.model)
    check_openai_features(body)
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], (str, list)):
        prompts: list[str | list[int]] = list(body.prompt)  # type: ignore[arg-type]
    else:
        prompts = [body.prompt]  # type: ignore[list-item]
    if body.echo and body.stream:
        raise ServerHTTPError(
            400,
            "echo is not supported with stream=true; send stream=false, or leave echo out",
            param="stream",
        )
    max_tokens = svc.max_tokens(body.max_tokens, default=16)
    if body.echo and max_tokens == 0:
        _check_scorable(svc, prompts)
    spec, spec_field = _spec(body)
    spec = gated(spec, request_parser(body, svc.config.reasoning_parser))  # as SGLang: after the reasoning
    start = 0 if body.echo and body.logprobs is not None else -1
    params = _params(svc, body, max_tokens, body.logprobs, "logprobs")
    fields = [f"prompt.{i}" for i in range(len(prompts))] if len(prompts) > 1 else ["prompt"]
    subs = [Submission(p, params, spec, start, f, spec_field) for p, f in zip(prompts, fields)]
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": svc.model_name}
    if body.stream:
        if len(subs) != 1:
            raise ServerHTTPError(
                400,
                f"stream=true takes one prompt, and prompt holds a batch of {len(subs)}; send one "
                "request per prompt, or stream=false",
                param="stream",
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(
            await prime(
                _stream_completion(svc, subs[0], head, include_usage, body.logprobs is not None), request
            )
        )
    results = await svc.run_many(subs, request)
    choices = []
    for i, (res, sub) in enumerate(zip(results, subs)):
        prompt_text = sub.prompt if isinstance(sub.prompt, str) else svc.engine.tokenizer.decode(sub.prompt)
        text = (prompt_text + res.text) if body.echo else res.text
        logprobs = None
        if body.logprobs is not None:
            ids = (
                (sub.prompt if isinstance(sub.prompt, list) else svc.engine.encode(sub.prompt))
                if body.echo
                else None
            )
            logprobs = completion_logprobs(
                svc, res, ids, prompt_text, body.skip_special_tokens, not isinstance(sub.prompt, str)
            )
        choices.append(
            {
                "index": i,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": res.finish_reason,
                **_stop_fields(res),
            }
        )
    return {**head, "choices": choices, "usage": _usage(results)}


def _check_scorable(svc: EngineService, prompts: list[str | list[int]]) -> None:
    """Scoring a text (echo, max_tokens 0) runs it as a prompt, and the engine takes prompts of
    at most context - 1 tokens; say so, rather than "shorten the prompt" with no reason."""
    ctx = svc.engine.config.context_len
    for i, p in enumerate(prompts):
        with blame(f"prompt.{i}" if len(prompts) > 1 else "prompt"):
            n = len(p) if isinstance(p, list) else len(svc.engine.encode(p))
        if n >= ctx:
            raise ServerHTTPError(
                400,
                f"echo with max_tokens 0 scores the prompt by running it, and this server runs prompts "
                f"of at most {ctx - 1} tokens (the model's context is {ctx}); this one has {n}: score "
                "a shorter text (drop its first tokens)",
                param=f"prompt.{i}" if len(prompts) > 1 else "prompt",
            )


async def _stream_completion(
    svc: EngineService, sub: Submission, head: dict[str, Any], include_usage: bool, with_logprobs: bool
) -> AsyncIterator[dict[str, Any]]:
    logged = StreamLogprobs(svc, sub.params.skip_special_tokens) if with_logprobs else None
    async for item in svc.stream(sub):
        if isinstance(item, StreamChunk):
            lp = logged.completion(item) if logged is not None else None
            if item.text or lp:
                yield {
                    **head,
                    "choices": [{"index": 0, "text": item.text, "logprobs": lp, "finish_reason": None}],
                }
            continue
        lp = logged.completion_rest(item) if logged is not None else None
        yield {
            **head,
            "choices": [
                {
                    "index": 0,
                    "text": "",
                    "logprobs": lp,
                    "finish_reason": item.finish_reason,
                    **_stop_fields(item),
                }
            ],
        }
        if include_usage:
            yield {**head, "choices": [], "usage": _usage([item])}
        if (error := _abort_error(item)) is not None:
            yield error


# --- chat completions --------------------------------------------------------------------
@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    svc = service_of(request)
    _check_model(svc, body.model)
    check_openai_features(body)
    reasoning = chat_reasoning(svc.config.reasoning_parser, body)
    messages = [m.for_template(f"messages.{i}") for i, m in enumerate(body.messages)]
    prompt = render_chat(svc, messages, True, body.chat_template_kwargs)
    top = (body.top_logprobs or 0) if body.logprobs else None
    if top is None and body.top_logprobs:
        raise ServerHTTPError(
            400,
            "top_logprobs needs logprobs=true; send logprobs=true, or leave top_logprobs out",
            param="top_logprobs",
        )
    max_tokens = _chat_max_tokens(svc, body)
    params = _params(svc, body, max_tokens, top, "top_logprobs")
    spec, spec_field = _spec(body)
    if reasoning is not None:  # the constraint covers the answer: the reasoning runs free
        spec = reasoning.gate(spec)
    sub = Submission(prompt, params, spec, prompt_param="messages", constraint_param=spec_field)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "created": created, "model": svc.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream_chat(svc, sub, head, include_usage, body.logprobs, ChatDeltas(reasoning))
        return EventStream(await prime(events, request))
    res = await svc.run(sub, request)
    choice = {
        "index": 0,
        "message": chat_message(res.text, reasoning),
        "logprobs": chat_logprobs(svc, res) if body.logprobs else None,
        "finish_reason": res.finish_reason,
        **_stop_fields(res),
    }
    return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage([res])}


def _delta_chunk(head: dict[str, Any], delta: dict[str, Any], lp: Any) -> dict[str, Any]:
    return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}]}


async def _stream_chat(
    svc: EngineService,
    sub: Submission,
    head: dict[str, Any],
    include_usage: bool,
    with_logprobs: bool,
    deltas: ChatDeltas,
) -> AsyncIterator[dict[str, Any]]:
    head = {**head, "object": "chat.completion.chunk"}
    logged = StreamLogprobs(svc, sub.params.skip_special_tokens) if with_logprobs else None
    async for item in svc.stream(sub):
        if isinstance(item, StreamChunk):
            lp = logged.chat(item) if logged is not None else None
            out = deltas.feed(item.text, keep=bool(lp))
            for k, delta in enumerate(out):  # the chunk's logprobs go with its last delta
                yield _delta_chunk(head, delta, lp if k == len(out) - 1 else None)
            continue
        for delta in deltas.finish():  # what the reasoning split held back
            yield _delta_chunk(head, delta, None)
        lp = logged.chat_rest(item) if logged is not None else None
        yield {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "logprobs": lp,
                    "finish_reason": item.finish_reason,
                    **_stop_fields(item),
                }
            ],
        }
        if include_usage:
            yield {**head, "choices": [], "usage": _usage([item])}
        if (error := _abort_error(item)) is not None:
            yield error
