"""Backends for programs: the default backend, and ``Runtime``, the embedded engine as a backend.

``Runtime()`` loads the bundled model (``llmir-tiny``); ``Runtime("path/to/checkpoint",
kv_memory="2GiB")`` any supported Hugging Face checkpoint, with ``Engine`` options. It is a
``Backend`` (so ``f.run(backend=rt)`` works) and a context manager that shuts the engine down.
Its ``abort_requests(futures)`` (``EngineBackend``'s) stops the engine requests behind futures it
returned (what the segment evaluator calls when a run is interrupted or cancelled).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from llmir_lang.dsl.errors import NoBackendError
from llmir_lang.executor.backend import Backend, ChainRequest, ChunkCallback

_default: Backend | None = None
_default_lock = threading.Lock()


def set_default_backend(backend: Backend | None) -> None:
    """The backend programs run on when ``run`` gets no ``backend=`` (None clears it)."""
    global _default
    if backend is not None and not isinstance(backend, Backend):
        raise TypeError(
            f"set_default_backend takes a Backend (e.g. llmir.Runtime()), got {type(backend).__name__}"
        )
    with _default_lock:
        _default = backend


def get_default_backend() -> Backend | None:
    with _default_lock:
        return _default


def resolve_backend(backend: Backend | None, program: str) -> Backend:
    """``backend``, else the default one, else a ``NoBackendError`` that says how to set one."""
    chosen = backend if backend is not None else get_default_backend()
    if chosen is None:
        raise NoBackendError(
            "no backend to run on: pass backend=llmir.Runtime() to run(), or call "
            "llmir.set_default_backend(llmir.Runtime()) once",
            program,
        )
    if not isinstance(chosen, Backend):
        raise TypeError(f"backend must be a Backend (e.g. llmir.Runtime()), got {type(chosen).__name__}")
    return chosen


class Runtime(Backend):
    """The embedded engine as a backend. ``model=None`` is the bundled model; ``engine_options``
    go to ``Engine`` (``device``, ``dtype``, ``kv_memory``, ``max_running_requests``, ...)."""

    def __init__(
        self, model: str | None = None, *, model_path: str | None = None, **engine_options: Any
    ) -> None:
        from llmir_lang.executor.backend import EngineBackend
        from llmir_lang.executor.engine import Engine

        self.engine = Engine(model if model is not None else model_path, **engine_options)
        self.backend = EngineBackend(self.engine)

    @property
    def shares_prefix_in_batch(self) -> bool:  # type: ignore[override]
        return self.backend.shares_prefix_in_batch

    def submit(self, request: ChainRequest, on_chunk: ChunkCallback | None = None) -> Future:
        return self.backend.submit(request, on_chunk)

    def abort_requests(self, futures: Iterable[Future]) -> None:
        self.backend.abort_requests(futures)

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        return self.backend.score(prompt, continuations)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.backend.apply_chat_template(messages, add_generation_prompt)

    def unpin(self, prompt: str) -> None:
        self.backend.unpin(prompt)

    def stats(self) -> dict[str, Any]:
        return self.backend.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
