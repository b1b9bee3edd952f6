"""``Endpoint``: an SGLang server or router through SGLang's native API (``/generate``), or an
llmir server, whose extensions it uses too (``/score``, ``/apply_chat_template``, ``/program``);
``RuntimeEndpoint``: the same under SGLang's name and constructor."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmir_lang.errors import InvalidRequestError, NotYetSupportedError
from llmir_lang.executor.backend import GenStep, StepResult
from llmir_lang.executor.remote_errors import _SHAPE_ERRORS, RemoteBackendError
from llmir_lang.executor.remote_http import _DEFAULT_MAX_TOKENS, _FINISH_OK, _HTTPBackend, _non_default
from llmir_lang.executor.remote_reasoning import _ReasoningGate
from llmir_lang.executor.remote_tokens import _check_prompt_ids, _merge_error


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


def _entry_texts(entries: Any) -> list[str] | None:
    """The texts of SGLang's ``(logprob, token id, text)`` entries, or None where they have none
    (asked without ``return_text_in_logprobs``, or an entry without its text)."""
    if not entries or not all(len(e) > 2 and isinstance(e[2], str) for e in entries):
        return None
    return [e[2] for e in entries]


_TRIPLE_KEYS = (
    "output_token_logprobs",
    "output_top_logprobs",
    "input_token_logprobs",
    "unconditional_token_logprobs",  # a select's, with unconditional_likelihood_normalized
)


def _meta_from_json(meta: Any) -> Any:
    """A variable's meta info as the embedded engine gives it: the ``(logprob, token id, text)``
    triples of its logprob keys are tuples again (JSON made them lists), also in a joined fork's
    ``branches``."""
    if not isinstance(meta, dict):
        return meta

    def tuples(value: Any) -> Any:
        if isinstance(value, list):
            if len(value) == 3 and not any(isinstance(v, (list, dict)) for v in value):
                return tuple(value)
            return [tuples(v) for v in value]
        return value

    out = {k: tuples(v) if k in _TRIPLE_KEYS else v for k, v in meta.items()}
    if isinstance(out.get("branches"), list):
        out["branches"] = [_meta_from_json(b) for b in out["branches"]]
    return out


def _choices_regex(choices_json: str) -> str:
    from llmir_lang.executor.constraints.spec import escape_regex

    return "(?:" + "|".join(escape_regex(c) for c in json.loads(choices_json)) + ")"


class Endpoint(_ReasoningGate, _HTTPBackend):
    """An SGLang server or router, or an llmir server (``llmir serve``), at ``url``.

    ``protocol``: ``"auto"`` (ask ``/health`` on first use), ``"llmir"`` or ``"sglang"``. An SGLang
    server cannot render the chat template: give ``tokenizer=`` for programs with roles. Grammar
    constraints go as ``ebnf`` in llguidance's lark syntax (an llmir server also takes GBNF; SGLang
    needs its llguidance grammar backend). A gen whose ``max_tokens`` is the default (128) is sent
    without ``max_new_tokens``, so the server's own default applies (128 on SGLang; on an llmir
    server 128 capped by its ``--max-tokens-limit``).

    A constrained gen inside ``separate_reasoning`` is constrained after the reasoning: an llmir
    server is told so per request; an SGLang server must have been started with a
    ``--reasoning-parser`` of the same end tag, which its ``/get_server_info`` says, else
    ``ReasoningParserMismatchError`` says what to do before anything is sent (``remote_reasoning``).
    """

    def __init__(self, url: str, api_key: str | None = None, *, protocol: str = "auto", **http: Any) -> None:
        if protocol not in ("auto", "llmir", "sglang"):
            raise InvalidRequestError(f"protocol must be 'auto', 'llmir' or 'sglang', got {protocol!r}")
        super().__init__(url, api_key, **http)
        self._protocol: str | None = None if protocol == "auto" else protocol
        self._init_reasoning_gate()

    _api = "SGLang's /generate API (base_url: the server's root URL)"

    @property
    def protocol(self) -> str:
        """``"llmir"`` if the server is an llmir server (``/program``, ``/score``), else ``"sglang"``.

        Asked once, from ``/health``. Only an answer is remembered: a server that cannot be reached,
        or answers with an error, raises ``RemoteBackendError`` (with the URL and the cause) and is
        asked again next time, so a server that was down at first use is not taken for SGLang."""
        if self._protocol is None:
            r = self._request("GET", "/health")
            if r.status_code == 404:
                raise RemoteBackendError(
                    f"{self.base_url}/health: HTTP 404: no server answers there; give the server's root "
                    "URL (no /v1 or other path), or protocol='sglang' for a server without /health",
                    404,
                    r.text[:500],
                )
            if r.status_code != 200:
                raise self._fail("/health", r)
            try:
                info = r.json() if r.content else {}
            except ValueError:
                info = {}  # SGLang answers with an empty body
            self._protocol = "llmir" if isinstance(info, dict) and info.get("server") == "llmir" else "sglang"
        return self._protocol

    def _lower(self, step: GenStep) -> dict[str, Any]:
        p = step.params
        p.validate()
        sp: dict[str, Any] = {"temperature": p.temperature}
        if p.max_new_tokens != _DEFAULT_MAX_TOKENS:  # the default: the server's (capped by its limit)
            sp["max_new_tokens"] = p.max_new_tokens
        sp |= _non_default({
            "min_new_tokens": (p.min_new_tokens, 0), "top_p": (p.top_p, 1.0), "top_k": (p.top_k, -1),
            "min_p": (p.min_p, 0.0), "frequency_penalty": (p.frequency_penalty, 0.0),
            "presence_penalty": (p.presence_penalty, 0.0), "repetition_penalty": (p.repetition_penalty, 1.0),
            "stop": (list(p.stop), []), "stop_token_ids": (list(p.stop_token_ids), []),
            "stop_regex": (list(p.stop_regex), []), "ignore_eos": (p.ignore_eos, False), "skip_special_tokens": (p.skip_special_tokens, True),
            "sampling_seed": (p.seed, None),
        })  # fmt: skip
        spec = step.constraint
        if spec is not None:
            key = {"json_schema": "json_schema", "grammar": "ebnf"}.get(spec.kind, "regex")
            sp[key] = _choices_regex(spec.value) if spec.kind == "choices" else spec.value
        body: dict[str, Any] = {"sampling_params": sp, **self._gate_fields(step)}
        if p.return_logprob or step.logprob_start_len >= 0:
            # the texts too: without tokenizer= they are the only source of return_text_in_logprobs
            body.update(
                return_logprob=True, top_logprobs_num=p.top_logprobs_num, return_text_in_logprobs=True
            )
        if step.logprob_start_len >= 0:
            body.update(logprob_start_len=step.logprob_start_len)
        return body

    def _generate(
        self,
        text: str,
        body: dict[str, Any],
        on_text: Callable[[str], None] | None,
        stop: threading.Event | None = None,
    ) -> StepResult:
        body = {**body, "text": text}
        if on_text is None:
            return self._read_step(self._post("/generate", body), streamed=False)
        last: dict[str, Any] = {}
        sent = 0
        for event in self._events("/generate", {**body, "stream": True}, stop):
            full = event.get("text", "")
            if not isinstance(full, str):
                raise self._malformed("/generate", f"text is a {type(full).__name__}", event)
            if len(full) > sent:  # SGLang streams the whole text so far
                on_text(full[sent:])
                sent = len(full)
            last = event
        return self._read_step(last, streamed=True)

    def _read_step(self, out: Any, streamed: bool) -> StepResult:
        """``_step_result`` of an answer (a stream's last event), which must have finished."""
        try:
            if out.get("meta_info", {}).get("finish_reason") is None:
                if streamed:
                    raise self._unfinished("/generate", out)
                raise self._malformed("/generate", "no meta_info.finish_reason", out)
            return self._step_result(out)
        except _SHAPE_ERRORS as e:
            raise self._malformed("/generate", e, out) from None

    @staticmethod
    def _step_result(out: dict[str, Any]) -> StepResult:
        meta = out.get("meta_info", {})
        finish = meta.get("finish_reason") or {}
        finish = finish if isinstance(finish, dict) else {"type": str(finish)}
        kind = finish.get("type", "unknown")
        lps = meta.get("output_token_logprobs")
        ids = list(out.get("output_ids") or [])
        if not ids and lps and all(isinstance(e, (list, tuple)) and len(e) > 1 for e in lps):
            ids = [e[1] for e in lps]  # SGLang's (logprob, token id, text) entries carry the ids
        tops = meta.get("output_top_logprobs")
        inputs = meta.get("input_token_logprobs")
        return StepResult(
            name=None,
            text=out.get("text", ""),
            token_ids=ids,
            finish_reason=kind,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=int(meta.get("completion_tokens", 0)),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            logprobs=[e[0] for e in lps] if lps is not None else None,
            top_logprobs=[[(e[1], e[0]) for e in top or []] for top in tops] if tops is not None else None,
            error=None
            if kind in _FINISH_OK
            else f"generation ended with {kind}: {finish.get('message', '')}",
            meta={"remote_id": meta.get("id")},
            prompt_logprobs=[(e[1], e[0]) for e in inputs] if inputs is not None else None,
            prompt_texts=_entry_texts(inputs),
            token_texts=_entry_texts(lps),
            top_texts=[_entry_texts(top) or [] for top in tops]
            if tops and any(_entry_texts(t) for t in tops)
            else None,
            matched_stop=finish.get("matched") if kind == "stop" else None,
        )

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        """The engine's scoring: an llmir server's ``/score``; on SGLang, ``/generate`` over the
        token ids of the prompt followed by each choice's own tokens, with the logprobs from the
        prompt's last token on (so "Par" + "ma" is scored as the tokens of "ma" after those of
        "Par", whatever "Parma" tokenizes to).

        The ids come from ``tokenizer=`` or the server's ``/tokenize``. A server with neither tells
        the ids of texts through ``input_token_logprobs``: the prompt's exactly, a choice's as the
        tokens of prompt+choice past the prompt's, which are its own tokens unless its text merges
        with the prompt's end; then ``NotYetSupportedError`` asks for ``tokenizer=``."""
        conts = list(continuations)
        if self.protocol == "llmir":
            out = self._post("/score", {"prompt": prompt, "continuations": conts})
            try:
                scores = out["logprobs"]
                if len(scores) != len(conts) or not all(isinstance(lps, list) for lps in scores):
                    raise ValueError(f"{len(conts)} lists of logprobs expected")
            except _SHAPE_ERRORS as e:
                raise self._malformed("/score", e, out) from None
            return scores
        if not conts:
            return []
        ids = self._choice_ids(prompt, conts) or self._ids_from_logprobs(prompt, conts)
        p_ids, c_ids = ids
        body = {
            "input_ids": [p_ids + c for c in c_ids],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": len(p_ids) - 1,
        }
        outs = self._post("/generate", body)
        outs = [outs] if isinstance(outs, dict) else outs
        scores = []
        try:
            if len(outs) != len(c_ids):
                raise ValueError(f"{len(c_ids)} answers expected, one per input")
            for out, c in zip(outs, c_ids):
                entries = out["meta_info"].get("input_token_logprobs") or []
                lps = [e[0] for e in entries[-len(c) :]]
                if len(entries) <= len(c) - 1 or len(lps) != len(c) or any(v is None for v in lps):
                    raise RemoteBackendError(
                        f"{self.base_url}/generate: expected logprobs of {len(c)} continuation tokens, "
                        f"got input_token_logprobs {entries[-len(c) - 1 :]!r}"
                    )
                scores.append([float(v) for v in lps])
        except _SHAPE_ERRORS as e:
            raise self._malformed("/generate", e, outs) from None
        return scores

    def _ids_from_logprobs(self, prompt: str, conts: list[str]) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, choice ids) read from ``input_token_logprobs`` (see ``score``)."""
        body = {
            "text": [prompt] + [prompt + c for c in conts],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        outs = self._post("/generate", body)
        try:
            ids = [[int(e[1]) for e in o["meta_info"]["input_token_logprobs"]] for o in outs]
            if len(ids) != len(conts) + 1:
                raise ValueError(f"{len(conts) + 1} answers expected, one per text")
        except _SHAPE_ERRORS as e:
            raise self._malformed("/generate", e, outs) from None
        p_ids, c_ids = ids[0], []
        _check_prompt_ids(p_ids)
        for c, full in zip(conts, ids[1:]):
            if full[: len(p_ids)] != p_ids or len(full) == len(p_ids):
                raise _merge_error(self.base_url, c, None)
            c_ids.append(full[len(p_ids) :])
        return p_ids, c_ids

    def _server_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.protocol != "llmir":
            return super()._server_chat_template(messages, add_generation_prompt)
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        return self._text_of("/apply_chat_template", self._post("/apply_chat_template", body))

    def run_program(
        self,
        ir: str,
        args: dict[str, str] | list[dict[str, str]] | None = None,
        passes: str | None = None,
        stop: threading.Event | None = None,
    ) -> ProgramReply:
        """Run a whole program on an llmir server in one round trip. ``ir``: IR text (e.g.
        ``print_ir(f.trace())``); ``args``: one dict (one function) or one per function;
        ``passes``: the server's pipeline (None: its default). Setting ``stop`` (from another
        thread) ends the call at once with ``ChainAborted``, and the server aborts the run."""
        if self.protocol != "llmir":
            raise NotYetSupportedError(
                f"{self.base_url} is not an llmir server, so it cannot run whole programs; "
                "run the program with backend=Endpoint(url) instead (one request per call)"
            )
        if not isinstance(ir, str):
            raise InvalidRequestError(
                f"run_program takes IR text (print_ir(module)), got {type(ir).__name__}"
            )
        body = {"ir": ir, "args": args, "passes": passes}
        out = self._post("/program", body) if stop is None else self._post_abortable("/program", body, stop)
        functions = []
        try:
            for fn in out["functions"]:
                states = []
                for st in fn["states"]:
                    err = st.get("error") or {}
                    states.append(
                        RemoteState(
                            st["text"],
                            dict(st["vars"]),
                            {k: _meta_from_json(m) for k, m in (st.get("meta") or {}).items()},
                            err.get("message"),
                            err.get("var"),
                        )
                    )
                functions.append((fn["name"], states))
            stats = dict(out.get("stats") or {})
        except _SHAPE_ERRORS as e:
            raise self._malformed("/program", e, out) from None
        return ProgramReply(functions, stats)

    # --- SGLang's server calls ----------------------------------------------------------------
    def flush_cache(self) -> None:
        """Drop the server's cached prefixes (``/flush_cache``, on SGLang and llmir servers)."""
        r = self._request("POST", "/flush_cache", {})
        if r.status_code >= 400:
            raise self._fail("/flush_cache", r)

    def get_server_info(self) -> dict[str, Any]:
        """The server's description: SGLang's ``/get_server_info`` (``/server_info`` on newer
        servers; its settings, ``reasoning_parser`` among them), on an llmir server with its
        ``/health`` (an llmir server older than its ``/get_server_info``: ``/get_model_info``)."""
        if self.protocol == "llmir":
            info = self._json("GET", "/health")
            r = self._request("GET", "/get_server_info")
            more = self._json("GET", "/get_model_info") if r.status_code == 404 else None
            if more is None and r.status_code >= 400:
                raise self._fail("/get_server_info", r)
            return {**info, **(more if more is not None else self._answer("/get_server_info", r))}
        r = self._request("GET", "/get_server_info")
        if r.status_code == 404:
            return self._json("GET", "/server_info")
        if r.status_code >= 400:
            raise self._fail("/get_server_info", r)
        return self._answer("/get_server_info", r)

    def _json(self, method: str, path: str) -> Any:
        r = self._request(method, path)
        if r.status_code >= 400:
            raise self._fail(path, r)
        return self._answer(path, r)


class RuntimeEndpoint(Endpoint):
    """``Endpoint`` under SGLang's name and constructor: ``RuntimeEndpoint(base_url, api_key=None,
    verify=None)``, an SGLang server (or an llmir server) at ``base_url``.

    Unlike SGLang's, it does not call the server when it is made (the first request does), and it
    has no ``chat_template_name``: roles render through the model's own template, which an SGLang
    server cannot render, so give ``tokenizer=`` (a Hugging Face tokenizer or its path) for
    programs with roles. Other ``Endpoint`` options (``protocol``, ``timeout``, ...) go by keyword.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        verify: bool | str | None = None,
        chat_template_name: str | None = None,
        **options: Any,
    ) -> None:
        if chat_template_name is not None:
            raise NotYetSupportedError(
                f"RuntimeEndpoint(chat_template_name={chat_template_name!r}): SGLang's chat template "
                "table is not used here; roles render through the model's own template: pass "
                "tokenizer= (the model's Hugging Face tokenizer or its path) instead"
            )
        super().__init__(base_url, api_key, verify=True if verify is None else verify, **options)
