"""``OpenAI``: any OpenAI-compatible server through ``/v1/completions`` (constraints as vLLM's
``guided_*`` fields or ``response_format``, scoring with ``echo`` + ``logprobs``), built in
llmir's form ``OpenAI(base_url, model)`` or SGLang's ``OpenAI("model-name", base_url=...)``."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from llmir_lang.errors import InvalidRequestError, NotYetSupportedError
from llmir_lang.executor.backend import GenStep, StepResult
from llmir_lang.executor.remote_errors import _SHAPE_ERRORS, RemoteBackendError
from llmir_lang.executor.remote_http import _DEFAULT_MAX_TOKENS, _FINISH_OK, _HTTPBackend, _non_default
from llmir_lang.executor.remote_tokens import _merge_error


class OpenAI(_HTTPBackend):
    """An OpenAI-compatible server at ``base_url`` (ending in ``/v1``) serving ``model``.

    ``constraints``: ``"vllm"`` sends ``guided_regex`` / ``guided_json`` / ``guided_grammar`` /
    ``guided_choice``; ``"response_format"`` sends JSON schemas as ``response_format`` (other
    constraints raise ``NotYetSupportedError``); ``"none"`` refuses every constraint.

    ``max_tokens`` is always sent (OpenAI servers default to 16 when it is left out). A gen whose
    ``max_tokens`` is the default (128) and that a server refuses for being above its limit
    (``llmir serve --max-tokens-limit N`` says so in its 400) is sent again with N, and N is
    remembered; an explicit max_tokens of another value above the limit stays an error.

    SGLang's form names the model first: ``OpenAI("model-name", is_chat_model=None,
    base_url=..., api_key=...)``, the URL and key defaulting to ``OPENAI_BASE_URL`` (else
    ``https://api.openai.com/v1``) and ``OPENAI_API_KEY`` as in the openai client. It always
    speaks ``/v1/completions`` (the prompt rendered here, roles through the chat template), so a
    model that only the chat API serves fails at its first request; ``is_chat_model=True``,
    ``chat_template`` and ``is_azure`` raise ``NotYetSupportedError``.

    A server that splits reasoning off (``reasoning_content`` or ``reasoning`` beside ``text``): the
    gen's value is the answer (``text``, as SGLang's OpenAI backend takes), the reasoning
    ``get_meta_info(name)["reasoning_content"]``. llmir's and SGLang's completions never split.
    """

    def __init__(
        self,
        url_or_model: str | None = None,
        model: str | bool | None = None,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        constraints: str = "vllm",
        is_chat_model: bool | None = None,
        chat_template: Any = None,
        is_azure: bool = False,
        model_name: str | None = None,
        **http: Any,
    ) -> None:
        if model_name is not None:  # SGLang's keyword for the model
            if url_or_model is not None and url_or_model != model_name and model is None:
                raise InvalidRequestError(
                    f"OpenAI got two models, {url_or_model!r} and model_name={model_name!r}"
                )
            if isinstance(model, str):
                raise InvalidRequestError(f"OpenAI got two models, {model!r} and model_name={model_name!r}")
            url_or_model = model_name
        if constraints not in ("vllm", "response_format", "none"):
            raise InvalidRequestError(
                f"constraints: 'vllm', 'response_format' or 'none', not {constraints!r}"
            )
        if isinstance(model, str):  # llmir's form: OpenAI(base_url, model, api_key=None)
            if url_or_model is not None and base_url is not None and url_or_model != base_url:
                raise InvalidRequestError(f"OpenAI got two base URLs, {url_or_model!r} and {base_url!r}")
            url = url_or_model if url_or_model is not None else base_url
            if not url:
                raise InvalidRequestError(
                    f"OpenAI(model={model!r}) needs the server's base_url (ending in /v1)"
                )
        else:  # SGLang's form: OpenAI(model_name, is_chat_model=None, ..., base_url=..., api_key=...)
            model, is_chat_model = _sglang_openai_model(url_or_model, model, is_chat_model)
            url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
            api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        _refuse_openai_options(is_chat_model, chat_template, is_azure, http)
        super().__init__(url, api_key, **http)
        self.model = model
        self.constraints = constraints
        self._tokenize_fields = {"model": model}
        self._max_tokens_limit: int | None = None  # learned from a refused default max_tokens

    _api = "OpenAI's /v1/completions API (base_url ending in /v1)"

    @property
    def _root(self) -> str:
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    @property
    def model_name(self) -> str:
        """The model (SGLang's attribute name)."""
        return self.model

    is_chat_model = False  # SGLang's attribute: this backend always sends /v1/completions

    def _lower(self, step: GenStep) -> dict[str, Any]:
        p = step.params
        p.validate()
        body: dict[str, Any] = {"model": self.model, "max_tokens": p.max_new_tokens}
        body |= _non_default({
            "temperature": (p.temperature, None),
            "top_p": (p.top_p, 1.0), "frequency_penalty": (p.frequency_penalty, 0.0),
            "presence_penalty": (p.presence_penalty, 0.0), "stop": (list(p.stop), []), "seed": (p.seed, None),
            # vLLM's extra sampling fields, sent only when set
            "top_k": (p.top_k, -1), "min_p": (p.min_p, 0.0), "repetition_penalty": (p.repetition_penalty, 1.0),
            "min_tokens": (p.min_new_tokens, 0), "ignore_eos": (p.ignore_eos, False),
            "stop_token_ids": (list(p.stop_token_ids), []), "skip_special_tokens": (p.skip_special_tokens, True),
        })  # fmt: skip
        if p.stop_regex:
            raise NotYetSupportedError(
                f"gen({step.name!r}, stop_regex={p.stop_regex!r}): OpenAI's API has no regex stop; "
                "use stop= strings, or Endpoint (an SGLang or llmir server) or the embedded Runtime"
            )
        if step.logprob_start_len >= 0:
            raise NotYetSupportedError(
                f"gen({step.name!r}, logprob_start_len={step.logprob_start_len}): the OpenAI backend "
                "does not report a prompt's token logprobs; use Endpoint (an SGLang or llmir server) "
                "or the embedded Runtime"
            )
        if p.return_logprob:
            body["logprobs"] = p.top_logprobs_num
        spec = step.constraint
        if spec is None:
            return body
        if self.constraints == "vllm":
            key = {"regex": "guided_regex", "json_schema": "guided_json", "grammar": "guided_grammar"}
            value: Any = json.loads(spec.value) if spec.kind in ("json_schema", "choices") else spec.value
            body[key.get(spec.kind, "guided_choice")] = value
        elif self.constraints == "response_format" and spec.kind == "json_schema":
            schema = {"name": "output", "schema": json.loads(spec.value)}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        else:
            raise NotYetSupportedError(
                f"gen({step.name!r}) has a {spec.kind} constraint, which OpenAI(constraints="
                f"{self.constraints!r}) cannot send; use constraints='vllm' for a vLLM server"
            )
        return body

    def _generate(
        self,
        text: str,
        body: dict[str, Any],
        on_text: Callable[[str], None] | None,
        stop: threading.Event | None = None,
    ) -> StepResult:
        body = {**body, "prompt": text}
        default = body["max_tokens"] == _DEFAULT_MAX_TOKENS
        limit = self._max_tokens_limit
        if default and limit is not None:
            body["max_tokens"] = min(limit, _DEFAULT_MAX_TOKENS)
        try:
            return self._complete(body, on_text, stop)
        except RemoteBackendError as e:
            limit = _refused_limit(e) if body["max_tokens"] == _DEFAULT_MAX_TOKENS else None
            if limit is None or limit >= _DEFAULT_MAX_TOKENS:
                raise
            self._max_tokens_limit = limit  # refused before anything was generated: send again
            return self._complete({**body, "max_tokens": limit}, on_text, stop)

    def _complete(
        self, body: dict[str, Any], on_text: Callable[[str], None] | None, stop: threading.Event | None = None
    ) -> StepResult:
        if on_text is None:
            out = self._post("/completions", body)
            try:
                choice, usage = out["choices"][0], out.get("usage") or {}
                got, finish, thought = choice.get("text", ""), choice.get("finish_reason"), _reasoning(choice)
                if finish is None:
                    raise ValueError("no finish_reason")
                got = "" if got is None and thought is not None else got  # reasoning, no answer
                res = self._completion(body, got, finish, usage, choice.get("logprobs") or {})
                res.matched_stop = _matched_stop(choice, finish)
                if thought is not None:
                    res.meta["reasoning_content"] = thought
                return res
            except _SHAPE_ERRORS as e:
                raise self._malformed("/completions", e, out) from None
        got, finish, usage, last, matched = "", None, {}, None, None
        thoughts: list[str] | None = None  # reasoning a server split off, streamed beside the text
        parts: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        streamed = False  # logprobs came with the chunks
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        for event in self._events("/completions", stream_body, stop):
            last, pieces = event, []
            try:
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    piece = choice.get("text")
                    if piece and not isinstance(piece, str):
                        raise TypeError(f"text is a {type(piece).__name__}")
                    pieces.append(piece or "")
                    if (thought := _reasoning(choice)) is not None:
                        thoughts = thoughts if thoughts is not None else []
                        thoughts.append(thought)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                        matched = _matched_stop(choice, finish)
                    part = choice.get("logprobs")
                    if part:
                        streamed = True
                        for key, values in parts.items():
                            values.extend(part.get(key) or [])
            except _SHAPE_ERRORS as e:
                raise self._malformed("/completions", e, event) from None
            for piece in pieces:
                if piece:
                    on_text(piece)
                    got += piece
        if finish is None:
            raise self._unfinished("/completions", last)
        try:
            res = self._completion(body, got, finish, usage, parts if streamed else {})
        except _SHAPE_ERRORS as e:
            raise self._malformed("/completions", e, last) from None
        res.matched_stop = matched
        if thoughts is not None:
            res.meta["reasoning_content"] = "".join(thoughts)
        return res

    @staticmethod
    def _completion(
        body: dict[str, Any], got: str, finish: str, usage: dict[str, Any], lp: dict[str, Any]
    ) -> StepResult:
        if not isinstance(got, str) or not isinstance(finish, str):
            raise TypeError(f"text {type(got).__name__}, finish_reason {type(finish).__name__}")
        tops = lp.get("top_logprobs") if body.get("logprobs") else None
        # OpenAI's top alternatives are {token text: logprob} maps, most likely first by value
        ranked = [sorted((t or {}).items(), key=lambda kv: -kv[1]) for t in tops] if tops else None
        return StepResult(
            name=None,
            text=got,
            token_ids=[],
            finish_reason=finish,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            logprobs=lp.get("token_logprobs"),
            top_logprobs=[[(None, v) for _, v in top] for top in ranked] if ranked is not None else None,
            error=None if finish in _FINISH_OK else f"generation ended with {finish}",
            token_texts=lp.get("tokens"),
            top_texts=[[k for k, _ in top] for top in ranked] if ranked is not None else None,
        )

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        """The engine's scoring over ``/completions`` with ``echo``, ``logprobs`` and
        ``max_tokens: 0``: the prompts sent are token ids, the prompt's followed by each choice's
        own (from ``tokenizer=`` or the server's ``/tokenize``), and a choice's logprobs are those
        of its last tokens, exactly as the engine scores it.

        A server without ``/tokenize`` (and no ``tokenizer=``) gets the joined texts; a choice is
        then scored from the token that starts where the prompt ends, which is the engine's answer
        whenever the prompt and the choice tokenize apart. Where a token straddles the boundary
        ("Par" + "ma" -> "P|arm|a") no text request can give that answer: ``NotYetSupportedError``
        asks for ``tokenizer=``."""
        conts = list(continuations)
        if not conts:
            return []
        ids = self._choice_ids(prompt, conts)
        if ids is not None:
            p_ids, c_ids = ids
            choices = self._echo([p_ids + c for c in c_ids])
            return [self._tail(ch, len(c)) for ch, c in zip(choices, c_ids)]
        out = []
        choices = self._echo([prompt + c for c in conts])
        try:
            for ch, c in zip(choices, conts):
                lp = ch["logprobs"]
                starts, tokens = list(lp["text_offset"]), [str(t) for t in lp["tokens"]]
                joined, text = "".join(tokens), prompt + c
                # offsets count the text of special tokens (a BOS) the server put before the prompt
                boundary = len(prompt) + (len(joined) - len(text) if joined.endswith(text) else 0)
                first = next((i for i, o in enumerate(starts) if o >= boundary), len(starts))
                if first == len(starts) or starts[first] != boundary:
                    raise _merge_error(self.base_url, c, tokens[first - 1] if first > 0 else None)
                out.append(self._tail(ch, len(starts) - first))
        except _SHAPE_ERRORS as e:
            raise self._malformed("/completions", e, choices) from None
        return out

    def _tail(self, choice: dict[str, Any], n: int) -> list[float]:
        try:
            lps = list(choice["logprobs"]["token_logprobs"])[-n:]
            if len(lps) != n or any(v is None for v in lps):
                raise RemoteBackendError(
                    f"{self.base_url}/completions: expected the logprobs of {n} echoed tokens, got {lps!r}"
                )
            return [float(v) for v in lps]
        except _SHAPE_ERRORS as e:
            raise self._malformed("/completions", e, choice) from None

    def _echo(self, prompts: list[Any]) -> list[dict[str, Any]]:
        """The choices (in order) of a scoring request: echo + logprobs, nothing generated."""
        body = {"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0}
        try:
            out = self._post("/completions", body)
        except RemoteBackendError as e:
            if not _refuses_echo(e):
                raise  # wrong key, unknown model, server down or failing: not a missing feature
            raise NotYetSupportedError(
                f"scoring (select) needs /completions with echo, logprobs and max_tokens 0, which "
                f"{self.base_url} does not support ({e}); use a server that does (vLLM, llmir) or Endpoint"
            ) from None
        try:
            choices = sorted(out["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts):
                raise ValueError(f"{len(prompts)} choices expected, one per prompt")
        except _SHAPE_ERRORS as e:
            raise self._malformed("/completions", e, out) from None
        if any(not c.get("logprobs") for c in choices):
            raise NotYetSupportedError(
                f"{self.base_url}/completions answered an echo request without logprobs; scoring "
                "(select) needs a server that returns them (vLLM, llmir) or Endpoint"
            )
        return choices

    def _fail(self, path: str, response: Any) -> RemoteBackendError:
        err, root = super()._fail(path, response), self.base_url  # OpenAI's API lives under /v1
        if response.status_code == 404 and path == "/completions" and not root.endswith("/v1"):
            if "model" not in err.detail.lower():
                err.args = (f"{err}; base_url must be the API's root, which ends in /v1 ({root}/v1?)",)
        return err

    def _server_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """An llmir server renders it (``/apply_chat_template`` at the root); a server without the
        route cannot (``NotYetSupportedError``: pass ``tokenizer=``). Other failures (wrong key,
        server down) are ``RemoteBackendError``s that say so."""
        url = self._root + "/apply_chat_template"
        r = self._request("POST", url, {"messages": messages, "add_generation_prompt": add_generation_prompt})
        if r.status_code in (404, 405, 501):
            return super()._server_chat_template(messages, add_generation_prompt)
        if r.status_code != 200:
            raise self._fail(url, r)
        return self._text_of(url, self._answer(url, r))


_HTTP_OPTIONS = ("tokenizer", "timeout", "max_workers", "verify")


def _sglang_openai_model(
    name: str | None, second: bool | None, is_chat_model: bool | None
) -> tuple[str, bool | None]:
    """(model, is_chat_model) of SGLang's ``OpenAI(model_name, is_chat_model=None, ...)``."""
    if name is None:
        raise InvalidRequestError('OpenAI needs the model: OpenAI(base_url, model) or OpenAI("model-name")')
    if "://" in name:
        raise InvalidRequestError(
            f"OpenAI({name!r}) needs the model too: OpenAI(base_url, model), or SGLang's "
            f'OpenAI("model-name", base_url={name!r})'
        )
    if second is not None:  # SGLang's second positional parameter
        if not isinstance(second, bool) or (is_chat_model is not None and is_chat_model != second):
            raise InvalidRequestError(
                f"OpenAI({name!r}, {second!r}): the second argument is the model name or is_chat_model"
            )
        is_chat_model = second
    return name, is_chat_model


def _refuse_openai_options(
    is_chat_model: bool | None, chat_template: Any, is_azure: bool, http: dict
) -> None:
    """SGLang's OpenAI options this backend cannot honour, and openai-client options it lacks."""
    if is_chat_model:
        raise NotYetSupportedError(
            "OpenAI(is_chat_model=True): this backend speaks /v1/completions only (it renders roles "
            "through the chat template itself); leave is_chat_model out for a server that serves "
            "the model on /v1/completions (vLLM, SGLang, llmir), or run the program on SGLang"
        )
    if chat_template is not None:
        raise NotYetSupportedError(
            "OpenAI(chat_template=...): roles render through the model's own template; pass "
            "tokenizer= (its Hugging Face tokenizer or path) when the server cannot render it"
        )
    if is_azure:
        raise NotYetSupportedError(
            "OpenAI(is_azure=True): Azure OpenAI is not supported; give base_url= instead"
        )
    unknown = sorted(set(http) - set(_HTTP_OPTIONS))
    if unknown:
        raise InvalidRequestError(
            f"OpenAI got unknown option(s) {unknown}; it takes base_url, api_key, constraints and "
            f"{', '.join(_HTTP_OPTIONS)}"
        )


def _reasoning(choice: dict[str, Any]) -> str | None:
    """The reasoning a server's reasoning parser split off a choice's text, or None."""
    value = choice.get("reasoning_content")
    value = choice.get("reasoning") if value is None else value  # vLLM's newer name
    if value is not None and not isinstance(value, str):
        raise TypeError(f"reasoning_content is a {type(value).__name__}")
    return value


def _matched_stop(choice: dict[str, Any], finish: str) -> str | int | None:
    """What ended a ``"stop"``: vLLM's ``stop_reason`` or SGLang's ``matched_stop`` (a stop
    string or a token id; llmir sends both); None where the server does not say (OpenAI)."""
    if finish != "stop":
        return None
    value = choice.get("stop_reason", choice.get("matched_stop"))
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _refused_limit(e: RemoteBackendError) -> int | None:
    """The limit an llmir server gave when it refused a max_tokens above it, else None."""
    m = re.search(r"above this server's limit of (\d+)", e.detail) if e.status == 400 else None
    return int(m.group(1)) if m else None


def _refuses_echo(e: RemoteBackendError) -> bool:
    """Whether a server's refusal of a scoring request says it lacks the feature (echo, logprobs,
    max_tokens 0, token-id prompts), rather than a key, model, or server failure."""
    if e.status == 501:
        return True
    return e.status in (400, 422) and re.search(r"echo|logprob|max_tokens|prompt", e.detail, re.I) is not None
