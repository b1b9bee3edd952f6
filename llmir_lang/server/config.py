"""Server settings (what ``llmir serve`` parses from the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmir_lang.errors import InvalidRequestError
from llmir_lang.ir.reasoning import reasoning_format_problem


@dataclass(slots=True)
class ServerConfig:
    """Settings of one server process.

    ``api_key``: when set, every route except ``/health`` needs ``Authorization: Bearer <key>``
    (or ``X-API-Key: <key>``). ``max_tokens_limit``: the most tokens one generation may ask for;
    a request that asks for more gets a 400 (None: the model's context length bounds it).
    ``max_request_bytes``: larger bodies get a 413 before any parsing. ``default_max_tokens``:
    what a chat completion without ``max_tokens`` generates (capped by the limit).
    ``shutdown_timeout_s``: on SIGTERM/SIGINT, how long in-flight requests may take to finish.
    ``reasoning_parser``: a reasoning format (``llmir_lang.ir.reasoning.FORMATS``, matched
    case-insensitively, held in lower case): chat completions split the reasoning off the answer
    (``reasoning_content``), and constraints start after the reasoning (``constraint_gate.py``),
    as SGLang's ``--reasoning-parser`` does; None: no split, constraints over the whole output.
    """

    model: str | None = None  # None: the bundled model
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    max_tokens_limit: int | None = None
    max_request_bytes: int = 8 * 2**20
    default_max_tokens: int = 128
    served_model_name: str | None = None
    kv_memory: str | float | None = None
    device: str | None = None
    max_running_requests: int = 256
    program_workers: int = 32
    shutdown_timeout_s: float = 30.0
    log_level: str = "info"
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None:
            self.reasoning_parser = self.reasoning_parser.lower()
            problem = reasoning_format_problem(self.reasoning_parser)
            if problem is not None:
                raise InvalidRequestError(f"--reasoning-parser: {problem}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise InvalidRequestError(f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}")
        if self.max_request_bytes < 1024:
            raise InvalidRequestError(
                f"--max-request-bytes must be >= 1024 (a request needs room for its JSON), "
                f"got {self.max_request_bytes}"
            )
        if not 0 < self.port < 65536:
            raise InvalidRequestError(f"--port must be in 1..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidRequestError("--api-key must not be empty; leave it out to serve without a key")

    def model_name(self, model_path: str | Path) -> str:
        """The name clients pass as ``model``: ``served_model_name`` or the checkpoint folder's name."""
        return self.served_model_name or Path(model_path).name
