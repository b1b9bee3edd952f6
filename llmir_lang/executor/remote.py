"""Remote backends: programs run on a server instead of the embedded engine.

- ``Endpoint(url)`` speaks SGLang's ``/generate`` API, so programs run unchanged on an SGLang
  server or router. Against an llmir server (detected from ``/health``) it also scores with
  ``/score`` (the engine's exact scoring), renders the model's own chat template with
  ``/apply_chat_template``, and ``run_program`` sends whole programs to ``/program``.
- ``OpenAI(base_url, model)`` speaks ``/v1/completions`` of any OpenAI-compatible server;
  constraints go as vLLM's ``guided_*`` fields (default) or as ``response_format`` (JSON schema
  only); ``score`` uses ``echo`` + ``logprobs``.

Both are ``Backend``s: a chain's steps run one request at a time (constant text is appended here,
between requests), streaming comes from server-sent events, ``pin``/``unpin`` are hints that
remote servers do not take. Local checks (sampling params, constraint support) raise in
``submit``; server and network failures are reported on ``ChainResult.error``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmir_lang.errors import InvalidRequestError, LLMIRError, NotYetSupportedError
from llmir_lang.executor.backend import Backend, ChainRequest, ChainResult, ChunkCallback, GenStep, StepResult

_FINISH_OK = ("stop", "length")


def _non_default(fields: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """``{name: (value, default)}`` -> the fields whose value differs from the default."""
    return {k: v for k, (v, default) in fields.items() if v != default}


class RemoteBackendError(LLMIRError):
    """A server refused or failed a request; the message has the URL, status and the server's words."""


@dataclass(slots=True)
class RemoteState:
    """One returned state of a program run on the server (``/program``)."""

    text: str
    vars: dict[str, str]
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None  # why the state failed, if it did
    error_var: str | None = None  # the gen / select that failed


@dataclass(slots=True)
class ProgramReply:
    """``/program``'s answer: per function (module order) its returned states, and run stats."""

    functions: list[tuple[str, list[RemoteState]]]
    stats: dict[str, Any]


class _HTTPBackend(Backend):
    """HTTP plumbing shared by both backends: a pooled client, JSON and SSE calls, a thread pool
    that runs chains (so ``submit`` returns at once and many chains run side by side).

    Options of both backends: ``tokenizer`` (a Hugging Face tokenizer or its path, for the chat
    template when the server cannot render it), ``timeout`` (seconds per request), ``max_workers``
    (chains in flight). Subclasses define ``_lower(GenStep) -> request body`` and
    ``_generate(text, body, on_text) -> StepResult``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        tokenizer: Any = None,
        timeout: float = 600.0,
        max_workers: int = 64,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_workers, max_keepalive_connections=max_workers),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="llmir-remote")
        self._tokenizer = tokenizer
        self._lock = threading.Lock()

    # --- HTTP ------------------------------------------------------------------------------
    def _fail(self, path: str, response: httpx.Response) -> RemoteBackendError:
        try:
            detail = response.json().get("error", {}).get("message") or response.text
        except (ValueError, AttributeError):
            detail = response.text
        return RemoteBackendError(f"{self.base_url}{path}: HTTP {response.status_code}: {str(detail)[:500]}")

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        r = self._client.post(path, json=body)
        if r.status_code >= 400:
            raise self._fail(path, r)
        return r.json()

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON events of a server-sent-events response, up to ``data: [DONE]``."""
        with self._client.stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise self._fail(path, r)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and "error" in event:
                    raise RemoteBackendError(f"{self.base_url}{path}: {event['error'].get('message', event)}")
                yield event

    # --- Backend ---------------------------------------------------------------------------
    def submit(self, request: ChainRequest, on_chunk: ChunkCallback | None = None) -> Future:
        lowered = [s if isinstance(s, str) else (s.name, self._lower(s)) for s in request.steps]
        if not any(not isinstance(s, str) for s in lowered):
            raise NotYetSupportedError("a chain needs at least one generation step")
        return self._pool.submit(self._run_chain, request.prompt, lowered, on_chunk)

    def _run_chain(self, prompt: str, lowered: list[Any], on_chunk: ChunkCallback | None) -> ChainResult:
        text, appended, results = prompt, "", []
        for step in lowered:
            if isinstance(step, str):
                text, appended = text + step, appended + step
                continue
            index = len(results)
            sink = (lambda t, i=index: on_chunk(i, t)) if on_chunk is not None else None
            try:
                res = self._generate(text, step[1], sink)
            except Exception as e:  # network or server failure: reported, never raised
                return ChainResult(results, appended, error=f"{type(e).__name__}: {e}")
            res.name = step[0]
            results.append(res)
            text, appended = text + res.text, appended + res.text
            if res.error:
                return ChainResult(results, appended, error=res.error)
        return ChainResult(results, appended)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        if self._tokenizer is None:
            return self._server_chat_template(messages, add_generation_prompt)
        with self._lock:
            if isinstance(self._tokenizer, str):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer)
        return self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _server_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        raise NotYetSupportedError(
            f"{self.base_url} cannot render the model's chat template; pass tokenizer=<Hugging Face "
            "tokenizer path or object> to the backend"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> _HTTPBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    _lower: Callable[[GenStep], dict[str, Any]]
    _generate: Callable[[str, dict[str, Any], Callable[[str], None] | None], StepResult]


def _choices_regex(choices_json: str) -> str:
    from llmir_lang.executor.constraints.spec import escape_regex

    return "(?:" + "|".join(escape_regex(c) for c in json.loads(choices_json)) + ")"


class Endpoint(_HTTPBackend):
    """An SGLang server or router, or an llmir server (``llmir serve``), at ``url``.

    ``protocol``: ``"auto"`` (ask ``/health``), ``"llmir"`` or ``"sglang"``. An SGLang server
    cannot render the chat template: give ``tokenizer=`` for programs with roles. Grammar constraints go as ``ebnf`` in llguidance's
    lark syntax (an llmir server also takes GBNF; SGLang needs its llguidance grammar backend).
    """

    def __init__(self, url: str, api_key: str | None = None, *, protocol: str = "auto", **http: Any) -> None:
        if protocol not in ("auto", "llmir", "sglang"):
            raise InvalidRequestError(f"protocol must be 'auto', 'llmir' or 'sglang', got {protocol!r}")
        super().__init__(url, api_key, **http)
        self._protocol: str | None = None if protocol == "auto" else protocol

    @property
    def protocol(self) -> str:
        """``"llmir"`` if the server is an llmir server (``/program``, ``/score``), else ``"sglang"``."""
        if self._protocol is None:
            try:
                r = self._client.get("/health")
                info = r.json() if r.status_code == 200 and r.content else {}
            except (httpx.HTTPError, ValueError):
                info = {}
            self._protocol = "llmir" if isinstance(info, dict) and info.get("server") == "llmir" else "sglang"
        return self._protocol

    def _lower(self, step: GenStep) -> dict[str, Any]:
        p = step.params
        p.validate()
        sp: dict[str, Any] = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature}
        sp |= _non_default({
            "min_new_tokens": (p.min_new_tokens, 0), "top_p": (p.top_p, 1.0), "top_k": (p.top_k, -1),
            "min_p": (p.min_p, 0.0), "frequency_penalty": (p.frequency_penalty, 0.0),
            "presence_penalty": (p.presence_penalty, 0.0), "repetition_penalty": (p.repetition_penalty, 1.0),
            "stop": (list(p.stop), []), "stop_token_ids": (list(p.stop_token_ids), []),
            "ignore_eos": (p.ignore_eos, False), "skip_special_tokens": (p.skip_special_tokens, True),
            "sampling_seed": (p.seed, None),
        })  # fmt: skip
        spec = step.constraint
        if spec is not None:
            key = {"json_schema": "json_schema", "grammar": "ebnf"}.get(spec.kind, "regex")
            sp[key] = _choices_regex(spec.value) if spec.kind == "choices" else spec.value
        body: dict[str, Any] = {"sampling_params": sp}
        if p.return_logprob:
            body.update(return_logprob=True, top_logprobs_num=p.top_logprobs_num)
        return body

    def _generate(self, text: str, body: dict[str, Any], on_text: Callable[[str], None] | None) -> StepResult:
        body = {**body, "text": text}
        if on_text is None:
            return self._step_result(self._post("/generate", body))
        last: dict[str, Any] = {}
        sent = 0
        for event in self._events("/generate", {**body, "stream": True}):
            full = event.get("text", "")
            if len(full) > sent:  # SGLang streams the whole text so far
                on_text(full[sent:])
                sent = len(full)
            last = event
        return self._step_result(last)

    @staticmethod
    def _step_result(out: dict[str, Any]) -> StepResult:
        meta = out.get("meta_info", {})
        finish = meta.get("finish_reason") or {}
        finish = finish if isinstance(finish, dict) else {"type": str(finish)}
        kind = finish.get("type", "unknown")
        lps = meta.get("output_token_logprobs")
        return StepResult(
            name=None,
            text=out.get("text", ""),
            token_ids=list(out.get("output_ids") or []),
            finish_reason=kind,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", 0)),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            logprobs=[e[0] for e in lps] if lps is not None else None,
            error=None
            if kind in _FINISH_OK
            else f"generation ended with {kind}: {finish.get('message', '')}",
            meta={"remote_id": meta.get("id")},
        )

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        if self.protocol == "llmir":
            return self._post("/score", {"prompt": prompt, "continuations": list(continuations)})["logprobs"]
        # SGLang: prefill the prompt (learning its token count), then score every prompt+choice from
        # the prompt's last token on; entries past the prompt belong to the continuation
        greedy0 = {"max_new_tokens": 0, "temperature": 0.0}
        n = self._post("/generate", {"text": prompt, "sampling_params": greedy0})["meta_info"][
            "prompt_tokens"
        ]
        texts = [prompt + c for c in continuations]
        body = {"text": texts, "sampling_params": greedy0, "return_logprob": True, "logprob_start_len": n - 1}
        outs = self._post("/generate", body)
        return [[e[0] for e in o["meta_info"]["input_token_logprobs"][1:] if e[0] is not None] for o in outs]

    def _server_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.protocol != "llmir":
            return super()._server_chat_template(messages, add_generation_prompt)
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        return self._post("/apply_chat_template", body)["text"]

    def run_program(
        self, ir: str, args: dict[str, str] | list[dict[str, str]] | None = None, passes: str | None = None
    ) -> ProgramReply:
        """Run a whole program on an llmir server in one round trip. ``ir``: IR text (e.g.
        ``print_ir(f.trace())``); ``args``: one dict (one function) or one per function;
        ``passes``: the server's pipeline (None: its default)."""
        if self.protocol != "llmir":
            raise NotYetSupportedError(
                f"{self.base_url} is not an llmir server, so it cannot run whole programs; "
                "run the program with backend=Endpoint(url) instead (one request per call)"
            )
        if not isinstance(ir, str):
            raise InvalidRequestError(
                f"run_program takes IR text (print_ir(module)), got {type(ir).__name__}"
            )
        out = self._post("/program", {"ir": ir, "args": args, "passes": passes})
        functions = []
        for fn in out["functions"]:
            states = []
            for st in fn["states"]:
                err = st.get("error") or {}
                states.append(
                    RemoteState(
                        st["text"], st["vars"], st.get("meta", {}), err.get("message"), err.get("var")
                    )
                )
            functions.append((fn["name"], states))
        return ProgramReply(functions, out.get("stats", {}))


class OpenAI(_HTTPBackend):
    """An OpenAI-compatible server at ``base_url`` (ending in ``/v1``) serving ``model``.

    ``constraints``: ``"vllm"`` sends ``guided_regex`` / ``guided_json`` / ``guided_grammar`` /
    ``guided_choice``; ``"response_format"`` sends JSON schemas as ``response_format`` (other
    constraints raise ``NotYetSupportedError``); ``"none"`` refuses every constraint.
    """

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, *, constraints: str = "vllm", **http: Any
    ) -> None:
        if constraints not in ("vllm", "response_format", "none"):
            raise InvalidRequestError(
                f"constraints: 'vllm', 'response_format' or 'none', not {constraints!r}"
            )
        super().__init__(base_url, api_key, **http)
        self.model = model
        self.constraints = constraints

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

    def _generate(self, text: str, body: dict[str, Any], on_text: Callable[[str], None] | None) -> StepResult:
        body = {**body, "prompt": text}
        if on_text is None:
            out = self._post("/completions", body)
            choice, usage = out["choices"][0], out.get("usage") or {}
            got, finish = choice.get("text", ""), choice.get("finish_reason") or "unknown"
            lp = choice.get("logprobs") or {}
        else:
            got, finish, usage, lp = "", "unknown", {}, {}
            stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            for event in self._events("/completions", stream_body):
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        on_text(choice["text"])
                        got += choice["text"]
                    finish = choice.get("finish_reason") or finish
        return StepResult(
            name=None,
            text=got,
            token_ids=[],
            finish_reason=finish,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            logprobs=lp.get("token_logprobs"),
            error=None if finish in _FINISH_OK else f"generation ended with {finish}",
        )

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        texts = [prompt + c for c in continuations]
        body = {"model": self.model, "prompt": texts, "max_tokens": 0, "echo": True, "logprobs": 0}
        try:
            choices = sorted(self._post("/completions", body)["choices"], key=lambda c: c["index"])
        except RemoteBackendError as e:
            raise NotYetSupportedError(
                f"scoring (select) needs /completions with echo and logprobs, which {self.base_url} "
                f"refused ({e}); use a server that supports them (vLLM, llmir) or Endpoint"
            ) from None
        out = []
        for choice in choices:
            lp = choice["logprobs"]
            # a token belongs to the continuation if it ends past the prompt
            ends = [o + len(t) for o, t in zip(lp["text_offset"], lp["tokens"])]
            out.append([v for v, e in zip(lp["token_logprobs"], ends) if e > len(prompt) and v is not None])
        return out

    def _server_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        r = self._client.post(f"{root}/apply_chat_template", json=body)
        if r.status_code != 200:
            return super()._server_chat_template(messages, add_generation_prompt)
        return r.json()["text"]
