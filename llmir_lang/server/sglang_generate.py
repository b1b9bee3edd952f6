"""SGLang's ``/generate``: a ``GenerateRequest`` in, SGLang's answer out.

Shared by the ``/generate`` route and the offline ``Engine`` (``llmir_lang.server.offline_engine``),
so that the same request gets the same answer (and the same errors, naming the same fields) from
both. ``generate_answer`` runs on the event loop that owns the ``EngineService``.

The answer of one prompt is ``{"text", "output_ids", "meta_info"}`` (``meta_info``: ``id``,
``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``finish_reason`` as SGLang's
object, and with ``return_logprob`` its logprob lists); a batch is a list of those. A stream is
events whose ``text`` is the whole text so far (as SGLang sends it), the last one the answer.

Under ``--reasoning-parser`` a request's constraint covers what follows the reasoning, as SGLang
gates every constraint then; the request's own ``reasoning_parser`` (llmir's) overrides the
server's, ``null`` keeping the constraint over the whole output (``constraint_gate.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from llmir_lang.executor.request import GenerateResult, StreamChunk
from llmir_lang.server.constraint_gate import gated, request_parser
from llmir_lang.server.convert import (
    constraint_spec,
    sampling_params,
    sglang_finish_reason,
    sglang_logprobs,
    stop_list,
)
from llmir_lang.server.errors import ServerHTTPError
from llmir_lang.server.protocol import (
    GenerateRequest,
    SGLangSamplingParams,
    check_generate_features,
    check_stop_token_ids,
)
from llmir_lang.server.service import EngineService, Submission


async def generate_answer(
    svc: EngineService, body: GenerateRequest, request: Request | None = None, text_field: str = "text"
) -> dict[str, Any] | list[dict[str, Any]] | AsyncIterator[dict[str, Any]]:
    """The answer to ``body``: one dict, a list of them for a batch, or (``stream``) the async
    iterator of its events. Bad input raises (``ServerHTTPError`` or a typed library error naming
    the field) before anything is submitted; a stream raises the engine's refusal of its prompt at
    its first item. ``request``: the HTTP request whose client is watched (None: none).
    ``text_field``: what the errors call the ``text`` field (the offline engine's ``prompt``)."""
    prompts, batch = _prompts(body, text_field)
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
    prompt_field = text_field if body.text is not None else "input_ids"
    parser = request_parser(body, svc.config.reasoning_parser)
    subs = [
        _submission(svc, p, sp, body, i, f"{prompt_field}.{i}" if batch else prompt_field, parser)
        for i, (p, sp) in enumerate(zip(prompts, sps))
    ]
    if body.stream:
        if batch:
            raise ServerHTTPError(
                400,
                f"stream=true takes one prompt, and {prompt_field} holds a batch of {len(prompts)}; "
                "send one request per prompt, or stream=false",
                param="stream",
            )
        return _stream(svc, subs[0], rids[0], body)
    results = await svc.run_many(subs, request)
    outs = [
        _output(svc, r, s, rid if rid is not None else str(r.rid), body)
        for r, s, rid in zip(results, subs, rids)
    ]
    return outs if batch else outs[0]


def _sampling_path(body: GenerateRequest, i: int) -> str:
    """Where prompt ``i``'s sampling params are in the request (the ``param`` of their errors):
    ``sampling_params``, or ``sampling_params.<i>`` in a list of them (as the validation errors
    name them)."""
    return f"sampling_params.{i}" if isinstance(body.sampling_params, list) else "sampling_params"


def _submission(
    svc: EngineService,
    prompt: str | list[int],
    p: SGLangSamplingParams | None,
    body: GenerateRequest,
    i: int,
    prompt_field: str,
    parser: str | None,
) -> Submission:
    """Prompt ``i``'s generation; its constraint starts after the reasoning of format ``parser``
    (None: it covers the whole output)."""
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
    return Submission(prompt, params, gated(spec, parser), start, prompt_field, spec_field)


def _prompts(body: GenerateRequest, text_field: str) -> tuple[list[str | list[int]], bool]:
    """(prompts, whether the request was a batch)."""
    if body.text is not None and body.input_ids is not None:
        raise ServerHTTPError(
            400,
            f"give exactly one of '{text_field}' and 'input_ids', not both; drop input_ids to send text",
            param="input_ids",
        )
    if body.text is None and body.input_ids is None:
        raise ServerHTTPError(
            400,
            f"give exactly one of '{text_field}' and 'input_ids': the prompt as text (a string, or a "
            "list of them for a batch) or as token ids (a list of ints, or a list of those)",
            param=text_field,
        )
    if body.text == [] or body.input_ids == []:
        # an empty batch was answered with an empty list (and as one prompt it has no token)
        field, what = (
            (text_field, "a string, or a non-empty list of strings for a batch")
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
) -> dict[str, Any]:
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
            yield _output(svc, item, sub, rid or str(item.rid), body)
