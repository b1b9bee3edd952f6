"""Request bodies of every route, as strict pydantic models.

Strict on purpose: an unknown field or a value of the wrong JSON type (``"temperature": "hot"``,
``"max_tokens": "8"``) is a 400 that names the field, never a silent coercion or an ignored typo.
Known fields of features the server does not implement (``n`` > 1, ``best_of``, ``tools``,
``image_data``, ``no_stop_trim``, ``suffix``, image content parts) are accepted here and refused
with a 501 by the routes (``check_*`` helpers below).
The SGLang and OpenAI field names and defaults are the upstream ones (SGLang's default temperature
is 1.0, OpenAI completions default to 16 tokens), so existing clients work unchanged.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llmir_lang.server.errors import ServerHTTPError, not_implemented


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


def _nullable(annotation: Any) -> bool:
    return (
        annotation is None
        or annotation is type(None)
        or (
            typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(annotation)
        )
    )


# --- SGLang native --------------------------------------------------------------------
class SGLangSamplingParams(_Body):
    """``sampling_params`` of ``/generate``. At most one of regex / json_schema / ebnf."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None


class GenerateRequest(_Body):
    """``/generate``: ``text`` (one string or a batch) or ``input_ids`` (one list or a batch)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SGLangSamplingParams | list[SGLangSamplingParams] | None = None
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    image_data: Any = None
    # llmir's: the format whose end tag starts the constraints (null: none; absent: the server's
    # --reasoning-parser, as SGLang gates them); see constraint_gate.py
    reasoning_parser: str | None = None


class TokenizeRequest(_Body):
    """``/tokenize`` (vLLM's format, which SGLang shares): token ids of ``prompt``."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class SeparateReasoningRequest(_Body):
    """SGLang's ``/separate_reasoning`` body: ``text`` to split, with ``reasoning_parser`` (a
    format of ``ir.reasoning.FORMATS``, any case; left out: the server's ``--reasoning-parser``)."""

    text: str
    reasoning_parser: str | None = None


class ScoreRequest(_Body):
    """``/score`` (llmir): per-token logprobs of each continuation after ``prompt``."""

    prompt: str
    continuations: list[str] = Field(min_length=1, max_length=1024)


class ContentPart(_Body):
    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class ChatMessage(_Body):
    # OpenAI's roles ("developer" is its newer name for "system", and is rendered as one); another
    # role would reach the chat template as is, which renders any string as a turn
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # a conversation that used tool calling: known, so that it is refused as such (501)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    # an earlier answer's reasoning, as a reasoning parser returned it: handed to the chat template
    # (Qwen3's renders it, most drop it)
    reasoning_content: str | None = None

    @property
    def template_role(self) -> str:
        """The role the chat template sees."""
        return "system" if self.role == "developer" else self.role

    def for_template(self, at: str = "messages") -> dict[str, str]:
        """The message as the chat template sees it (``at``: see ``text``)."""
        out = {"role": self.template_role, "content": self.text(at)}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        return out

    def text(self, at: str = "messages") -> str:
        """The message's text; ``at``: where it is in the request (``messages.<i>``), for errors."""
        if self.role in ("tool", "function") and self.tool_call_id is None and self.tool_calls is None:
            raise not_implemented(
                f"tool calling (a message with role {self.role!r})",
                "send the conversation as plain text messages",
            )
        if self.tool_calls is not None or self.tool_call_id is not None or self.function_call is not None:
            raise not_implemented(
                "tool calling (a message's tool_calls / tool_call_id / function_call)",
                "send the conversation as plain text messages",
            )
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for j, part in enumerate(self.content):
            if part.type != "text":
                raise not_implemented(
                    f"a {part.type!r} content part", "this server serves a text model: send text parts only"
                )
            if part.text is None:
                raise ServerHTTPError(
                    400,
                    f"{at}.content.{j} is a content part of type 'text' without a 'text' string; give it one",
                    param=f"{at}.content.{j}.text",
                )
        return "".join(p.text or "" for p in self.content)


class ChatTemplateRequest(_Body):
    """``/apply_chat_template`` (llmir): the model's own chat template rendered on the server."""

    messages: list[ChatMessage]
    add_generation_prompt: bool = False


# --- OpenAI ---------------------------------------------------------------------------
class JsonSchemaFormat(_Body):
    name: str = "output"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAIBase(_Body):
    """Fields shared by completions and chat completions, with vLLM's extra sampling and guided
    decoding fields (``guided_regex`` / ``guided_json`` / ``guided_grammar`` / ``guided_choice``)."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI's API takes ``null`` for its optional fields (openai-python sends it for a
        ``temperature=None`` argument): a null field whose type has no null takes its default."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if not (v is None and k in fields and not _nullable(fields[k].annotation))
        }

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # vLLM extensions
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    guided_regex: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    # SGLang's names for the same constraints (its OpenAI routes take them), and its regex stop
    regex: str | None = None
    ebnf: str | None = None
    stop_regex: str | list[str] | None = None


class CompletionRequest(_OpenAIBase):
    """``/v1/completions``. ``echo`` with ``logprobs`` scores the prompt (``max_tokens=0`` allowed)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    json_schema: dict[str, Any] | str | None = None  # SGLang's
    reasoning_parser: str | None = None  # llmir's, as /generate's (constraint_gate.py)


class ChatCompletionRequest(_OpenAIBase):
    """``/v1/chat/completions``; the prompt is the model's chat template over ``messages``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None  # the deprecated form of tools
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    # SGLang's: extra chat template variables, and (with ``--reasoning-parser``) the reasoning split
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool = True
    stream_reasoning: bool = True


# --- llmir programs ---------------------------------------------------------------------
class ProgramRequest(_Body):
    """``/program``: a whole program as IR text, its arguments, and the optimizer pipeline.

    ``args``: one dict for a module of one function, or one dict per function (in module order);
    every function parameter needs a string value. ``passes``: a pipeline string (None: the
    default pipeline; ``""``: run as written, call by call).
    """

    ir: str
    args: dict[str, str] | list[dict[str, str]] | None = None
    passes: str | None = None


# --- features the server does not implement: 501, naming them -----------------------------
def check_n(n: int, field: str = "n") -> None:
    if n < 1:
        raise ServerHTTPError(400, f"{field} must be >= 1, got {n}", param=field)
    if n > 1:
        raise not_implemented(
            f"{field}={n} (several samples per prompt)", f"send {field}=1 and repeat the request", field
        )


def check_generate_features(
    body: GenerateRequest, params: list[SGLangSamplingParams | None], paths: list[str] | None = None
) -> None:
    """``paths``: where each of ``params`` is in the request (``sampling_params``, or
    ``sampling_params.<i>`` in a list), for the errors' ``param``."""
    if body.image_data is not None:
        raise not_implemented(
            "image_data", "this server serves a text model: leave image_data out", "image_data"
        )
    for k, p in enumerate(params):
        if p is None:
            continue
        at = paths[k] if paths is not None else "sampling_params"
        check_n(p.n, f"{at}.n")
        if p.no_stop_trim:
            raise not_implemented(
                f"{at}.no_stop_trim",
                "leave it out; the matched stop string is in meta_info",
                f"{at}.no_stop_trim",
            )


def check_stop_token_ids(ids: list[int] | None, vocab_size: int, field: str) -> list[int]:
    """``ids`` (``[]`` for None) once each is a token id of the model, ``[0, vocab_size)``: the
    engine would take any id >= 0, and one the model cannot produce never stops anything (a typo
    that silently did nothing)."""
    for i, t in enumerate(ids or []):
        if not 0 <= t < vocab_size:
            raise ServerHTTPError(
                400,
                f"{field}[{i}] is {t}, which is not a token id of this model: its vocabulary has "
                f"{vocab_size} tokens (ids 0 to {vocab_size - 1}); remove it, or send the id of the "
                "token to stop at (POST /tokenize gives a text's ids)",
                param=field,
            )
    return list(ids or [])


# OpenAI's range for temperature; the engine (and SGLang's /generate) takes any value >= 0
OPENAI_MAX_TEMPERATURE = 2.0
# OpenAI's most top_logprobs (chat) per token, also vLLM's default limit for completions' logprobs
# (OpenAI's legacy completions stop at 5); the engine (and /generate) takes any number
OPENAI_MAX_TOP_LOGPROBS = 20


def check_openai_values(body: _OpenAIBase) -> None:
    """Values OpenAI's API refuses with a 400 that the engine would take, and OpenAI's own wording
    of its ranges where the engine's differs (``top_p``: OpenAI's [0, 1], where the engine takes
    (0, 1]; the route runs ``top_p`` 0 as top-k 1). The penalties' [-2, 2] is the engine's rule
    too, and ``n`` is checked by ``check_n``."""
    if body.stream_options is not None and not body.stream:
        raise ServerHTTPError(
            400,
            "stream_options is only allowed when stream is true; send stream=true or leave stream_options out",
            param="stream_options",
        )
    t = body.temperature
    if not 0.0 <= t <= OPENAI_MAX_TEMPERATURE:  # NaN fails too
        raise ServerHTTPError(
            400,
            f"temperature must be a number in [0, {OPENAI_MAX_TEMPERATURE:g}] (0 = greedy), got {t!r}",
            param="temperature",
        )
    p = body.top_p
    if not 0.0 <= p <= 1.0:  # NaN fails too
        raise ServerHTTPError(400, f"top_p must be a number in [0, 1] (1 = off), got {p!r}", param="top_p")
    field = "top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs"
    top = getattr(body, field, None)
    if top is not None and not 0 <= top <= OPENAI_MAX_TOP_LOGPROBS:
        raise ServerHTTPError(
            400,
            f"{field} must be an integer in [0, {OPENAI_MAX_TOP_LOGPROBS}] (the number of most likely "
            f"tokens reported at each position), got {top!r}",
            param=field,
        )


def check_openai_features(body: _OpenAIBase) -> None:
    check_openai_values(body)
    check_n(body.n)
    if isinstance(body, CompletionRequest):
        if body.best_of is not None:
            check_n(body.best_of, "best_of")
        if body.suffix is not None:
            raise not_implemented("suffix (insertion)", "leave suffix out", "suffix")
    if isinstance(body, ChatCompletionRequest):
        wants_tools = bool(body.tools) or body.tool_choice not in (None, "none", "auto")
        if wants_tools:
            raise not_implemented(
                "tool calling (tools / tool_choice)",
                "leave tools out; for structured output use response_format or guided_json",
                "tools",
            )
        if body.functions or body.function_call not in (None, "none", "auto"):
            raise not_implemented(
                "function calling (functions / function_call)",
                "leave them out; for structured output use response_format or guided_json",
                "functions",
            )
        if body.audio is not None or any(m != "text" for m in body.modalities or []):
            raise not_implemented(
                "audio output (modalities / audio)",
                'this server serves a text model: send modalities ["text"]',
                "modalities",
            )
