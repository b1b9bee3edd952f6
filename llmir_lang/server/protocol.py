"""Request bodies of every route, as strict pydantic models.

Strict on purpose: an unknown field or a value of the wrong JSON type (``"temperature": "hot"``,
``"max_tokens": "8"``) is a 400 that names the field, never a silent coercion or an ignored typo.
The SGLang and OpenAI field names and defaults are the upstream ones (SGLang's default temperature
is 1.0, OpenAI completions default to 16 tokens), so existing clients work unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


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
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: Literal[False] = False
    n: Literal[1] = 1
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


class ScoreRequest(_Body):
    """``/score`` (llmir): per-token logprobs of each continuation after ``prompt``."""

    prompt: str
    continuations: list[str] = Field(min_length=1, max_length=1024)


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


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

    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: Literal[1] = 1
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


class CompletionRequest(_OpenAIBase):
    """``/v1/completions``. ``echo`` with ``logprobs`` scores the prompt (``max_tokens=0`` allowed)."""

    prompt: str | list[str] | list[int]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: Literal[1] | None = None
    suffix: None = None


class ChatCompletionRequest(_OpenAIBase):
    """``/v1/chat/completions``; the prompt is the model's chat template over ``messages``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


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
