"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Structured output: ``response_format`` (``json_object`` / ``json_schema``) and vLLM's guided
decoding fields (``guided_regex``, ``guided_json``, ``guided_grammar``, ``guided_choice``), at most
one per request. Streaming is server-sent events of ``*.chunk`` objects ended by ``data: [DONE]``;
``stream_options.include_usage`` adds a last chunk with the token counts. Completions accept
``echo`` with ``logprobs`` (also with ``max_tokens=0``), which is how clients score a text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.server.convert import EventStream, constraint_spec, prime, text_offsets, token_text
from llmir_lang.server.errors import ServerHTTPError
from llmir_lang.server.protocol import ChatCompletionRequest, CompletionRequest, _OpenAIBase
from llmir_lang.server.routes_native import service_of
from llmir_lang.server.service import EngineService, Submission

router = APIRouter(prefix="/v1")


def _check_model(svc: EngineService, model: str) -> None:
    if model not in (svc.model_name, str(svc.engine.model_path)):
        raise ServerHTTPError(
            404,
            f"model {model!r} is not served here; this server serves {svc.model_name!r}",
            "model_not_found",
        )


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    svc = service_of(request)
    return {
        "object": "list",
        "data": [
            {
                "id": svc.model_name,
                "object": "model",
                "created": int(svc.counters.started_at),
                "owned_by": "llmir",
                "root": str(svc.engine.model_path),
                "max_model_len": svc.engine.config.context_len,
                "llmir": {"features": ["program", "score", "apply_chat_template"]},
            }
        ],
    }


def _spec(body: _OpenAIBase) -> Any:
    guided = constraint_spec(
        regex=body.guided_regex,
        json_schema=body.guided_json,
        grammar=body.guided_grammar,
        choices=body.guided_choice,
        source="guided decoding",
    )
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return guided
    if guided is not None:
        raise ServerHTTPError(400, "give either response_format or a guided_* field, not both")
    if fmt.type == "json_object":
        return constraint_spec(json_schema={"type": "object"})
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ServerHTTPError(
            400, "response_format type 'json_schema' needs json_schema.schema (a JSON Schema)"
        )
    return constraint_spec(json_schema=fmt.json_schema.schema_, source="response_format")


def _params(body: _OpenAIBase, max_tokens: int, logprobs: int | None) -> SamplingParams:
    if body.logit_bias:
        raise ServerHTTPError(
            501, "logit_bias is not supported by this server; remove it", "not_supported_error"
        )
    return SamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=min(body.min_tokens, max_tokens),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=body.stop or [],
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        return_logprob=logprobs is not None,
        top_logprobs_num=logprobs or 0,
    )


def _usage(results: list[GenerateResult]) -> dict[str, int]:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# --- completions -------------------------------------------------------------------------
def _completion_logprobs(
    svc: EngineService, res: GenerateResult, prompt_ids: list[int] | None, prompt_text: str
) -> dict[str, Any]:
    """OpenAI's legacy logprobs object; with echo (``prompt_ids`` given) it covers the prompt too,
    its first token without a logprob."""
    tok = svc.engine.tokenizer
    ids: list[int] = []
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if prompt_ids is not None:
        ids += prompt_ids
        lps += [None] + [lp for _, lp in res.prompt_logprobs or []]
        tops += [None] * len(prompt_ids)
    ids += res.token_ids
    lps += list(res.logprobs or [None] * len(res.token_ids))
    for top in res.top_logprobs or [[]] * len(res.token_ids):
        tops.append({tok.decode([t], skip_special_tokens=False): lp for t, lp in top} or None)
    offsets = text_offsets(tok, prompt_ids) if prompt_ids is not None else []
    base = len(prompt_text) if prompt_ids is not None else 0
    offsets += text_offsets(tok, res.token_ids, base)
    return {
        "tokens": token_text(tok, ids),
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    svc = service_of(request)
    _check_model(svc, body.model)
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
        prompts: list[str | list[int]] = list(body.prompt)  # type: ignore[arg-type]
    else:
        prompts = [body.prompt]  # type: ignore[list-item]
    if body.echo and body.stream:
        raise ServerHTTPError(400, "echo is not supported with stream=true; send stream=false")
    max_tokens = svc.max_tokens(body.max_tokens, default=16)
    spec = _spec(body)
    start = 0 if body.echo and body.logprobs is not None else -1
    params = _params(body, max_tokens, body.logprobs)
    subs = [Submission(p, params, spec, start) for p in prompts]
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": svc.model_name}
    if body.stream:
        if len(subs) != 1:
            raise ServerHTTPError(400, "stream=true takes one prompt; send one request per prompt")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(await prime(_stream_completion(svc, subs[0], head, include_usage)))
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
            logprobs = _completion_logprobs(svc, res, ids, prompt_text)
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": res.finish_reason})
    return {**head, "choices": choices, "usage": _usage(results)}


async def _stream_completion(
    svc: EngineService, sub: Submission, head: dict[str, Any], include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    async for item in svc.stream(sub):
        if isinstance(item, StreamChunk):
            if item.text:
                yield {
                    **head,
                    "choices": [{"index": 0, "text": item.text, "logprobs": None, "finish_reason": None}],
                }
            continue
        yield {
            **head,
            "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": item.finish_reason}],
        }
        if include_usage:
            yield {**head, "choices": [], "usage": _usage([item])}


# --- chat completions --------------------------------------------------------------------
def _chat_logprobs(svc: EngineService, res: GenerateResult) -> dict[str, Any]:
    tok = svc.engine.tokenizer
    content = []
    tops = res.top_logprobs or [[] for _ in res.token_ids]
    for t, lp, top in zip(res.token_ids, res.logprobs or [], tops):
        text = tok.decode([t], skip_special_tokens=False)
        content.append(
            {
                "token": text,
                "logprob": lp,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": (s := tok.decode([i], skip_special_tokens=False)),
                        "logprob": v,
                        "bytes": list(s.encode()),
                    }
                    for i, v in top
                ],
            }
        )
    return {"content": content}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    svc = service_of(request)
    _check_model(svc, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = svc.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    if top is None and body.top_logprobs:
        raise ServerHTTPError(400, "top_logprobs needs logprobs=true")
    sub = Submission(prompt, _params(body, svc.max_tokens(requested), top), _spec(body))
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "created": created, "model": svc.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(await prime(_stream_chat(svc, sub, head, include_usage)))
    res = await svc.run(sub, request)
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": res.text},
        "logprobs": _chat_logprobs(svc, res) if body.logprobs else None,
        "finish_reason": res.finish_reason,
    }
    return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage([res])}


async def _stream_chat(
    svc: EngineService, sub: Submission, head: dict[str, Any], include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    head = {**head, "object": "chat.completion.chunk"}
    first = True
    async for item in svc.stream(sub):
        if isinstance(item, StreamChunk):
            if item.text or first:
                delta = {"role": "assistant", "content": item.text} if first else {"content": item.text}
                first = False
                yield {
                    **head,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
                }
            continue
        yield {
            **head,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": item.finish_reason}],
        }
        if include_usage:
            yield {**head, "choices": [], "usage": _usage([item])}
