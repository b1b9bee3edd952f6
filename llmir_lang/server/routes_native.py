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
from llmir_lang.errors import (
    ChatTemplateRefusedError,
    EmptyPromptError,
    InvalidRequestError,
    PromptTooLongError,
)
from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.executor.tokenizer import lone_surrogate
from llmir_lang.server.convert import (
    EventStream,
    constraint_spec,
    prime,
    sampling_params,
    sglang_finish_reason,
    sglang_logprobs,
    stop_list,
)
from llmir_lang.server.errors import ServerHTTPError, with_param
from llmir_lang.server.protocol import (
    ChatTemplateRequest,
    GenerateRequest,
    ScoreRequest,
    SGLangSamplingParams,
    TokenizeRequest,
    check_generate_features,
    check_stop_token_ids,
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
def _sampling_path(body: GenerateRequest, i: int) -> str:
    """Where prompt ``i``'s sampling params are in the request (the ``param`` of their errors):
    ``sampling_params``, or ``sampling_params.<i>`` in a list of them (as the validation errors
    name them)."""
    return f"sampling_params.{i}" if isinstance(body.sampling_params, list) else "sampling_params"


def _prompt_field(body: GenerateRequest, i: int, batch: bool) -> str:
    field = "text" if body.text is not None else "input_ids"
    return f"{field}.{i}" if batch else field


def _submission(
    svc: EngineService,
    prompt: str | list[int],
    p: SGLangSamplingParams | None,
    body: GenerateRequest,
    i: int = 0,
    batch: bool = False,
) -> Submission:
    at = _sampling_path(body, i)
    p = p or SGLangSamplingParams()
    requested = p.max_new_tokens if "max_new_tokens" in p.model_fields_set else None
    max_new = svc.max_tokens(requested, field=f"{at}.max_new_tokens")
    params = sampling_params(
        [
            ("max_new_tokens", max_new, f"{at}.max_new_tokens"),
            ("min_new_tokens", p.min_new_tokens, f"{at}.min_new_tokens"),
            ("temperature", p.temperature, f"{at}.temperature"),
            ("top_p", p.top_p, f"{at}.top_p"),
            ("top_k", p.top_k, f"{at}.top_k"),
            ("min_p", p.min_p, f"{at}.min_p"),
            ("frequency_penalty", p.frequency_penalty, f"{at}.frequency_penalty"),
            ("presence_penalty", p.presence_penalty, f"{at}.presence_penalty"),
            ("repetition_penalty", p.repetition_penalty, f"{at}.repetition_penalty"),
            ("seed", p.sampling_seed, f"{at}.sampling_seed"),
            ("stop", stop_list(p.stop), f"{at}.stop"),
            ("stop_regex", stop_list(p.stop_regex), f"{at}.stop_regex"),
            (
                "stop_token_ids",
                check_stop_token_ids(p.stop_token_ids, svc.engine.config.vocab_size, f"{at}.stop_token_ids"),
                f"{at}.stop_token_ids",
            ),
            ("ignore_eos", p.ignore_eos, f"{at}.ignore_eos"),
            ("skip_special_tokens", p.skip_special_tokens, f"{at}.skip_special_tokens"),
            ("return_logprob", body.return_logprob, "return_logprob"),
            ("top_logprobs_num", body.top_logprobs_num if body.return_logprob else 0, "top_logprobs_num"),
        ]
    )
    spec, spec_field = constraint_spec(
        [
            ("regex", p.regex, f"{at}.regex"),
            ("json_schema", p.json_schema, f"{at}.json_schema"),
            ("grammar", p.ebnf, f"{at}.ebnf"),
        ]
    )
    start = body.logprob_start_len if body.return_logprob else -1
    return Submission(prompt, params, spec, start, _prompt_field(body, i, batch), spec_field)


def _prompts(body: GenerateRequest) -> tuple[list[str | list[int]], bool]:
    """(prompts, whether the request was a batch)."""
    if body.text is not None and body.input_ids is not None:
        raise ServerHTTPError(
            400,
            "give exactly one of 'text' and 'input_ids', not both; drop input_ids to send text",
            param="input_ids",
        )
    if body.text is None and body.input_ids is None:
        raise ServerHTTPError(
            400,
            "give exactly one of 'text' and 'input_ids': the prompt as text (a string, or a list of "
            "them for a batch) or as token ids (a list of ints, or a list of those)",
            param="text",
        )
    if body.text == [] or body.input_ids == []:
        # an empty batch was answered with an empty list (and as one prompt it has no token)
        field, what = (
            ("text", "a string, or a non-empty list of strings for a batch")
            if body.text is not None
            else (
                "input_ids",
                "token ids (a non-empty list of ints), or a non-empty list of those for a batch",
            )
        )
        raise ServerHTTPError(
            400, f"{field} is an empty list: no prompt to run; give the prompt as {what}", param=field
        )
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
                400,
                f"{len(sps)} sampling_params for {len(prompts)} prompts; give one each, or one "
                "sampling_params object for all of them",
                param="sampling_params",
            )
    else:
        sps = [sps] * len(prompts)
    check_generate_features(body, list(sps), [_sampling_path(body, i) for i in range(len(sps))])
    rids = body.rid if isinstance(body.rid, list) else [body.rid] * len(prompts)
    if len(rids) != len(prompts):
        raise ServerHTTPError(400, f"{len(rids)} rids for {len(prompts)} prompts; give one each", param="rid")
    subs = [_submission(svc, p, sp, body, i, batch) for i, (p, sp) in enumerate(zip(prompts, sps))]
    if body.stream:
        if batch:
            raise ServerHTTPError(
                400,
                f"stream=true takes one prompt, and {'text' if body.text is not None else 'input_ids'} "
                f"holds a batch of {len(prompts)}; send one request per prompt, or stream=false",
                param="stream",
            )
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
    """The events of one streamed ``/generate``, as SGLang sends them: each has the whole text so
    far and, in ``meta_info.completion_tokens``, the tokens generated so far (not the chunk's);
    the last one is the plain answer."""
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
    for i, c in enumerate(body.continuations):
        _check_text(c, f"continuations.{i}")
    loop = asyncio.get_running_loop()
    lps = await loop.run_in_executor(svc.programs, _score, svc.engine, body.prompt, body.continuations)
    return {"logprobs": lps}


def _check_text(text: str, field: str) -> None:
    """Text the tokenizer cannot take (a lone surrogate, which it refuses with a bare TypeError)
    is a 400 naming ``field``, as the engine's own check of a prompt is."""
    bad = lone_surrogate(text)
    if bad is not None:
        raise with_param(
            InvalidRequestError(
                f"{field} has a lone surrogate (U+{ord(bad.group()):04X}) at position {bad.start()}, "
                "which is not valid Unicode text and cannot be tokenized; remove or replace it"
            ),
            field,
        )


def _score(engine: Any, prompt: str, continuations: list[str]) -> list[list[float]]:
    """``engine.score``; a refusal names the field at fault (``prompt``, ``continuations.<i>``)."""
    try:
        return engine.score(prompt, continuations)
    except InvalidRequestError as e:
        raise with_param(e, _score_field(engine, prompt, continuations, e)) from None


def _score_field(engine: Any, prompt: str, continuations: list[str], exc: InvalidRequestError) -> str | None:
    """The field behind the engine's refusal of a /score request (on that failure path only): the
    prompt (empty, not tokenizable, too long alone), or the first continuation that has no token
    or does not fit in the context after the prompt."""
    if isinstance(exc, EmptyPromptError):
        return "prompt"
    try:
        n = len(engine.encode(prompt))
    except InvalidRequestError:
        return "prompt"
    ctx = engine.config.context_len
    if isinstance(exc, PromptTooLongError) and n >= ctx:
        return "prompt"
    for i, c in enumerate(continuations):
        m = len(engine.tokenizer.encode(c, add_special_tokens=False))
        # a continuation of more than one token is scored as one sequence after the prompt
        if m == 0 or (isinstance(exc, PromptTooLongError) and m > 1 and n + m >= ctx):
            return f"continuations.{i}"
    return None


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    svc = service_of(request)
    if body.model is not None:
        svc.check_model(body.model)
    _check_text(body.prompt, "prompt")
    ids = svc.engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": svc.engine.config.context_len}


@router.post("/apply_chat_template")
async def apply_chat_template(body: ChatTemplateRequest, request: Request) -> dict[str, Any]:
    svc = service_of(request)
    messages = [
        {"role": m.template_role, "content": m.text(f"messages.{i}")} for i, m in enumerate(body.messages)
    ]
    return {"text": render_chat(svc, messages, add_generation_prompt=body.add_generation_prompt)}


def render_chat(svc: EngineService, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The model's chat template over ``messages``. A template that refuses the conversation
    (``raise_exception`` in Llama 2's or Mistral's: roles that do not alternate, a system message
    it does not take) or fails on it is a 400 with the template's own message, not a 500 that
    clients would retry."""
    try:
        return svc.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ChatTemplateRefusedError as e:
        raise ServerHTTPError(400, str(e), param="messages") from None
