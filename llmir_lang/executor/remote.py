"""Remote backends: programs run on a server instead of the embedded engine.

- ``Endpoint(url)`` speaks SGLang's ``/generate`` API, so programs run unchanged on an SGLang
  server or router. Against an llmir server (detected from ``/health``) it also scores with
  ``/score`` (the engine's exact scoring), renders the model's own chat template with
  ``/apply_chat_template``, and ``run_program`` sends whole programs to ``/program``.
- ``RuntimeEndpoint(base_url, api_key=None, verify=None)`` is ``Endpoint`` under SGLang's name and
  constructor, for programs that move over from SGLang.
- ``OpenAI(base_url, model)`` speaks ``/v1/completions`` of any OpenAI-compatible server;
  constraints go as vLLM's ``guided_*`` fields (default) or as ``response_format`` (JSON schema
  only); ``score`` uses ``echo`` + ``logprobs``. SGLang's form ``OpenAI("model-name",
  base_url=..., api_key=...)`` works too (with ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` as the
  openai client reads them).

``score`` (what ``select`` uses) has the embedded engine's semantics on every server: the prompt and
each choice are tokenized separately (the prompt with the tokenizer's special tokens, the choice
without), and the logprobs are those of the choice's tokens after the prompt's tokens. Servers get
token ids, never the joined text, whose tokenization can merge the end of the prompt with the
start of a choice ("Par" + "ma" -> "P|arm|a"). The ids come from ``tokenizer=`` when given, else
from the server's ``/tokenize`` (vLLM, SGLang, llmir); see ``OpenAI.score`` and ``Endpoint.score``
for servers without it.

A constrained gen inside ``separate_reasoning`` is constrained after the reasoning on the
embedded engine; a server does that only where it gates constraints itself. ``Endpoint`` tells an
llmir server per request (llmir's ``reasoning_parser`` field), and on an SGLang server checks, from
``/get_server_info``, that it was started with a ``--reasoning-parser`` of the gen's end tag (and
that a gen constrained over its whole output meets a server without one): where not,
``ReasoningParserMismatchError`` says how to start the server or change the program before
anything is sent (``remote_reasoning``). ``OpenAI`` cannot tell what a server does: on a server
that does not gate (started without a reasoning parser), such a gen fails when its answer is
read, with an error that names this cause.

Both are ``Backend``s: a chain's steps run one request at a time (constant text is appended here,
between requests), streaming comes from server-sent events, ``pin``/``unpin`` are hints that
remote servers do not take. Local checks (sampling params, constraint support) raise in
``submit``; server and network failures are reported on ``ChainResult.error``, as a
``RemoteBackendError`` that says what the server did: an HTTP error (with its Retry-After), no
answer within ``timeout``, a connection that broke mid-answer, a body that is not JSON or not of
the API's shape, a 200 that carries an error, a stream that ended before its last event. Nothing
is sent again on such a failure (the one request sent again is ``OpenAI``'s refused default
``max_tokens``, see there).

The backends live in modules of their own, one concept each, and this module names them:
``remote_errors`` (``RemoteBackendError``, what a failed answer becomes), ``remote_http`` (the HTTP
base: deadlines, JSON and server-sent events, chains on a thread pool), ``remote_tokens`` (token
ids: ``tokenizer=`` or ``/tokenize``), ``remote_reasoning`` (where a server starts a reasoning
model's constraint), ``remote_sglang`` (``Endpoint``, ``RuntimeEndpoint``) and ``remote_openai``
(``OpenAI``).
"""

from __future__ import annotations

from llmir_lang.executor.remote_errors import ChainAborted, ReasoningParserMismatchError, RemoteBackendError
from llmir_lang.executor.remote_openai import OpenAI
from llmir_lang.executor.remote_sglang import Endpoint, ProgramReply, RemoteState, RuntimeEndpoint

__all__ = [
    "ChainAborted",
    "Endpoint",
    "OpenAI",
    "ProgramReply",
    "ReasoningParserMismatchError",
    "RemoteBackendError",
    "RemoteState",
    "RuntimeEndpoint",
]
