"""SGLang-compatible native routes, plus llmir's own helpers.

- ``POST /generate``: SGLang's API. ``text`` or ``input_ids`` (one or a batch), ``sampling_params``
  (with ``regex`` / ``json_schema`` / ``ebnf``), ``stream`` (server-sent events whose ``text`` is
  the whole text so far, as SGLang sends it), ``return_logprob`` / ``logprob_start_len`` /
  ``top_logprobs_num``, ``rid``; under ``--reasoning-parser`` a constraint starts after the
  reasoning, as on SGLang (llmir's ``reasoning_parser`` field chooses per request:
  ``constraint_gate.py``).
- ``GET /health`` (no API key needed), ``GET /get_model_info``, ``GET /get_server_info``
  (SGLang's: the server's settings, ``reasoning_parser`` among them, with the model's).
- ``POST /tokenize``: token ids of a text (vLLM's and SGLang's format); the remote backends use
  it to score choices over token ids, exactly as the engine does.
- ``POST /separate_reasoning``: SGLang's, ``{"text", "reasoning_parser"}`` ->
  ``{"text", "reasoning_text"}``: the answer and the reasoning ``split_reasoning`` splits off the
  text (the parser defaults to the server's ``--reasoning-parser``; an unknown one is a 400 that
  lists the names).
- llmir extensions: ``POST /score`` (per-token logprobs of continuations, the engine's exact
  ``score``), ``POST /apply_chat_template``, ``GET /stats``, ``POST /flush_cache``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

from fastapi import APIRouter, Request

from llmir_lang import __version__
from llmir_lang.errors import (
    ChatTemplateRefusedError,
    EmptyPromptError,
    InvalidRequestError,
    PromptTooLongError,
)
from llmir_lang.executor.tokenizer import lone_surrogate
from llmir_lang.ir.reasoning import FORMATS, split_reasoning
from llmir_lang.server.constraint_gate import checked_parser
from llmir_lang.server.convert import EventStream, prime
from llmir_lang.server.errors import ServerHTTPError, with_param
from llmir_lang.server.protocol import (
    ChatTemplateRequest,
    GenerateRequest,
    ScoreRequest,
    SeparateReasoningRequest,
    TokenizeRequest,
)
from llmir_lang.server.service import EngineService
from llmir_lang.server.sglang_generate import generate_answer

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


@router.get("/get_server_info")
async def server_info(request: Request) -> dict[str, Any]:
    """SGLang's: the server's settings (its ``ServerArgs`` there; ``ServerConfig`` here, without
    the API key), so that a client can see ``reasoning_parser``, with the model and the engine's
    counters (``internal_states``, as SGLang lists them)."""
    svc = service_of(request)
    settings = {k: v for k, v in dataclasses.asdict(svc.config).items() if k != "api_key"}
    return {
        **settings,
        "server": "llmir",
        "version": __version__,
        "model_path": str(svc.engine.model_path),
        "served_model_name": svc.model_name,
        "context_length": svc.engine.config.context_len,
        "internal_states": [await svc.engine_stats()],
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
@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, request: Request) -> Any:
    """SGLang's ``/generate`` (``sglang_generate.py``, shared with the offline ``Engine``)."""
    answer = await generate_answer(service_of(request), body, request)
    if body.stream:
        return EventStream(await prime(answer, request))  # type: ignore[arg-type]
    return answer


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


@router.post("/separate_reasoning")
async def separate_reasoning(body: SeparateReasoningRequest, request: Request) -> dict[str, Any]:
    """SGLang's: ``{"text": answer, "reasoning_text": reasoning}`` of ``body.text``, split as a
    chat answer is (``split_reasoning``)."""
    name = body.reasoning_parser
    if name is None:
        name = service_of(request).config.reasoning_parser
        if name is None:
            raise ServerHTTPError(
                400,
                "reasoning_parser is missing and this server has no --reasoning-parser: send "
                f"reasoning_parser, one of {', '.join(FORMATS)}",
                param="reasoning_parser",
            )
    reasoning, answer = split_reasoning(checked_parser(name), body.text)
    return {"text": answer, "reasoning_text": reasoning}


@router.post("/apply_chat_template")
async def apply_chat_template(body: ChatTemplateRequest, request: Request) -> dict[str, Any]:
    svc = service_of(request)
    messages = [m.for_template(f"messages.{i}") for i, m in enumerate(body.messages)]
    return {"text": render_chat(svc, messages, add_generation_prompt=body.add_generation_prompt)}


def render_chat(
    svc: EngineService,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The model's chat template over ``messages``. A template that refuses the conversation
    (``raise_exception`` in Llama 2's or Mistral's: roles that do not alternate, a system message
    it does not take) or fails on it is a 400 with the template's own message, not a 500 that
    clients would retry. ``template_kwargs``: more template variables (a chat request's
    ``chat_template_kwargs``, such as Qwen3's ``enable_thinking``); the renderer's own parameters
    are refused (400), not passed on."""
    kwargs = dict(template_kwargs or {})
    for key in kwargs:
        if key in _RENDERER_PARAMETERS:
            raise ServerHTTPError(
                400,
                f"chat_template_kwargs.{key} is a parameter of the chat template renderer, not a "
                "template variable; leave it out",
                param=f"chat_template_kwargs.{key}",
            )
    try:
        return svc.engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except ChatTemplateRefusedError as e:
        raise ServerHTTPError(400, str(e), param="messages") from None


# transformers' apply_chat_template parameters: a chat_template_kwargs key among them would change
# what the renderer returns (token ids, a dict) or clash with what the route passes
_RENDERER_PARAMETERS = frozenset(
    {
        "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip
