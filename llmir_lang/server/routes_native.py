"""SGLang-compatible native routes, plus llmir's own helpers.

- ``POST /generate``: SGLang's API. ``text`` or ``input_ids`` (one or a batch), ``sampling_params``
  (with ``regex`` / ``json_schema`` / ``ebnf``), ``stream`` (server-sent events whose ``text`` is
  the whole text so far, as SGLang sends it), ``return_logprob`` / ``logprob_start_len`` /
  ``top_logprobs_num``, ``rid``.
- ``GET /health`` (no API key needed), ``GET /get_model_info``.
- ``POST /tokenize``: token ids of a text (vLLM's and SGLang's format); the remote backends use
  it to score choices over token ids, exactly as the engine does.
- llmir extensions: ``POST /score`` (per-token logprobs of continuations, the engine's exact
  ``score``), ``POST /apply_chat_template``, ``GET /stats``, ``POST /flush_cache``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from llmir_lang import __version__
from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.executor.sampling_params import SamplingParams
from llmir_lang.server.convert import (
    EventStream,
    constraint_spec,
    prime,
    sglang_finish_reason,
    sglang_logprobs,
    stop_list,
)
from llmir_lang.server.errors import ServerHTTPError
from llmir_lang.server.protocol import (
    ChatTemplateRequest,
    GenerateRequest,
    ScoreRequest,
    SGLangSamplingParams,
    TokenizeRequest,
    check_generate_features,
)
from llmir_lang.server.service import EngineService, Submission

router = APIRouter()

FEATURES = ("generate", "program", "score", "tokenize", "apply_chat_template", "openai", "stream")


def service_of(request: Request) -> EngineService:
    return request.app.state.service


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    svc = service_of(request)
    svc.check_open()
    return {
        "status": "ok",
        "server": "llmir",
        "version": __version__,
        "model": svc.model_name,
        "features": list(FEATURES),
        "pid": os.getpid(),
    }


@router.get("/get_model_info")
async def model_info(request: Request) -> dict[str, Any]:
    svc = service_of(request)
    path = str(svc.engine.model_path)
    return {
        "model_path": path,
        "tokenizer_path": path,
        "is_generation": True,
        "served_model_name": svc.model_name,
        "context_length": svc.engine.config.context_len,
    }


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    return await service_of(request).engine_stats()


@router.post("/flush_cache")
async def flush_cache(request: Request) -> dict[str, Any]:
    svc = service_of(request)
    await asyncio.get_running_loop().run_in_executor(None, svc.engine.flush_cache)
    return {"flushed": True}


# --- /generate ---------------------------------------------------------------------------
def _submission(
    svc: EngineService, prompt: str | list[int], p: SGLangSamplingParams | None, body: GenerateRequest
) -> Submission:
    p = p or SGLangSamplingParams()
    params = SamplingParams(
        max_new_tokens=svc.max_tokens(p.max_new_tokens if "max_new_tokens" in p.model_fields_set else None),
        min_new_tokens=p.min_new_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty,
        seed=p.sampling_seed,
        stop=stop_list(p.stop),
        stop_regex=p.stop_regex or [],
        stop_token_ids=p.stop_token_ids or [],
        ignore_eos=p.ignore_eos,
        skip_special_tokens=p.skip_special_tokens,
        return_logprob=body.return_logprob,
        top_logprobs_num=body.top_logprobs_num if body.return_logprob else 0,
    )
    spec = constraint_spec(regex=p.regex, json_schema=p.json_schema, grammar=p.ebnf, source="sampling_params")
    start = body.logprob_start_len if body.return_logprob else -1
    return Submission(prompt, params, spec, start)


def _prompts(body: GenerateRequest) -> tuple[list[str | list[int]], bool]:
    """(prompts, whether the request was a batch)."""
    if (body.text is None) == (body.input_ids is None):
        raise ServerHTTPError(400, "give exactly one of 'text' and 'input_ids'")
    if body.text is not None:
        return ([body.text], False) if isinstance(body.text, str) else (list(body.text), True)
    ids = body.input_ids or []
    if ids and isinstance(ids[0], list):
        return [list(x) for x in ids], True  # type: ignore[arg-type]
    return [list(ids)], False  # type: ignore[arg-type]


def _output(
    svc: EngineService, res: GenerateResult, sub: Submission, rid: str, body: GenerateRequest
) -> dict:
    meta: dict[str, Any] = {
        "id": rid,
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "cached_tokens": res.cached_tokens,
        "finish_reason": sglang_finish_reason(res),
    }
    if body.return_logprob:
        ids = sub.prompt if isinstance(sub.prompt, list) else svc.engine.encode(sub.prompt)
        meta.update(
            sglang_logprobs(
                res, svc.engine.tokenizer, ids, sub.logprob_start_len, body.return_text_in_logprobs
            )
        )
    return {"text": res.text, "output_ids": res.token_ids, "meta_info": meta}


@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, request: Request) -> Any:
    svc = service_of(request)
    prompts, batch = _prompts(body)
    sps = body.sampling_params
    if isinstance(sps, list):
        if len(sps) != len(prompts):
            raise ServerHTTPError(
                400, f"{len(sps)} sampling_params for {len(prompts)} prompts; give one each"
            )
    else:
        sps = [sps] * len(prompts)
    check_generate_features(body, list(sps))
    rids = body.rid if isinstance(body.rid, list) else [body.rid] * len(prompts)
    if len(rids) != len(prompts):
        raise ServerHTTPError(400, f"{len(rids)} rids for {len(prompts)} prompts; give one each")
    subs = [_submission(svc, p, sp, body) for p, sp in zip(prompts, sps)]
    if body.stream:
        if batch:
            raise ServerHTTPError(400, "stream=true takes one prompt; send one request per prompt")
        return EventStream(await prime(_stream(svc, subs[0], rids[0], body), request))
    results = await svc.run_many(subs, request)
    outs = [
        _output(svc, r, s, rid if rid is not None else str(r.rid), body)
        for r, s, rid in zip(results, subs, rids)
    ]
    return outs if batch else outs[0]


async def _stream(
    svc: EngineService, sub: Submission, rid: str | None, body: GenerateRequest
) -> AsyncIterator[dict[str, Any]]:
    text, n_tokens = "", 0
    async for item in svc.stream(sub):
        if isinstance(item, StreamChunk):
            if not item.text and not item.token_ids:
                continue
            text += item.text
            n_tokens += len(item.token_ids)
            yield {
                "text": text,
                "meta_info": {
                    "id": rid or str(item.rid),
                    "completion_tokens": n_tokens,
                    "finish_reason": None,
                },
            }
        else:
            out = _output(svc, item, sub, rid or str(item.rid), body)
            yield out


# --- llmir extensions ----------------------------------------------------------------------
@router.post("/score")
async def score(body: ScoreRequest, request: Request) -> dict[str, Any]:
    svc = service_of(request)
    svc.check_open()
    loop = asyncio.get_running_loop()
    lps = await loop.run_in_executor(svc.programs, svc.engine.score, body.prompt, body.continuations)
    return {"logprobs": lps}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    svc = service_of(request)
    if body.model is not None:
        svc.check_model(body.model)
    ids = svc.engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": svc.engine.config.context_len}


@router.post("/apply_chat_template")
async def apply_chat_template(body: ChatTemplateRequest, request: Request) -> dict[str, Any]:
    svc = service_of(request)
    messages = [{"role": m.template_role, "content": m.text()} for m in body.messages]
    return {"text": render_chat(svc, messages, add_generation_prompt=body.add_generation_prompt)}


def render_chat(svc: EngineService, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The model's chat template over ``messages``. A template that refuses the conversation
    (``raise_exception`` in Llama 2's or Mistral's: roles that do not alternate, a system message
    it does not take) or fails on it is a 400 with the template's own message, not a 500 that
    clients would retry."""
    from jinja2 import TemplateError

    try:
        return svc.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise ServerHTTPError(
            400,
            f"this model's chat template refuses these messages: {e}; send messages it takes "
            "(for many templates: roles alternating user / assistant, a system message only first)",
        ) from None
