"""Backends for programs: the default backend, and ``Runtime``, the embedded engine as a backend.

``Runtime()`` loads the bundled model (``llmir-tiny``); ``Runtime("path/to/checkpoint",
kv_memory="2GiB")`` any supported Hugging Face checkpoint, with ``Engine`` options. It is a
``Backend`` (so ``f.run(backend=rt)`` works) and a context manager that shuts the engine down.
Its ``abort_requests(futures)`` (``EngineBackend``'s) stops the engine requests behind futures it
returned (what the segment evaluator calls when a run is interrupted or cancelled).

``Runtime`` also takes the SGLang ``ServerArgs`` keywords a program moving over from SGLang
passes (``model_path``, ``tp_size=1``, ``mem_fraction_static``, ``random_seed``, ...; see
``sglang_engine_options``), ``flush_cache()`` / ``get_server_info()`` act on the default
backend as SGLang's do, and SGLang's ``Runtime.generate`` (the ``/generate`` answer as JSON) and
``async_generate`` (streamed text pieces) run through the offline ``Engine``
(``server/offline_engine.py``) on the same engine.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NoReturn

from llmir_lang.dsl.errors import GenerationError, NoBackendError
from llmir_lang.errors import CheckpointError, InvalidRequestError, NotYetSupportedError
from llmir_lang.executor.backend import Backend, ChainRequest, ChunkCallback, GenStep
from llmir_lang.executor.sampling_params import SamplingParams

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


def _backend_with(method: str, backend: Backend | None) -> Any:
    """``backend`` (else the default one)'s ``method``, or a typed error saying why there is none."""
    chosen = backend if backend is not None else get_default_backend()
    if chosen is None:
        raise NoBackendError(
            f"{method}(): no backend: pass backend=..., or call llmir.set_default_backend(llmir.Runtime()) first"
        )
    bound = getattr(chosen, method, None)
    if not callable(bound):
        raise NotYetSupportedError(
            f"{method}(): the {type(chosen).__name__} backend has no {method}; use a Runtime or an "
            "Endpoint / RuntimeEndpoint (an SGLang or llmir server)"
        )
    return bound


def flush_cache(backend: Backend | None = None) -> None:
    """Drop the prefixes ``backend`` (default: the default backend) has cached, as SGLang's
    ``sgl.flush_cache()``: a ``Runtime``'s radix cache, or an SGLang / llmir server's."""
    _backend_with("flush_cache", backend)()


def get_server_info(backend: Backend | None = None) -> dict[str, Any]:
    """A description of ``backend`` (default: the default backend): the model, device and
    engine counters of a ``Runtime``, a server's own ``get_server_info`` answer (SGLang's)."""
    return _backend_with("get_server_info", backend)()


def cache_prefix(backend: Backend, text: str) -> None:
    """Compute ``text``'s KV into ``backend``'s prefix cache with a request that generates
    nothing, so later requests that start with it reuse it (SGLang's ``cache_prefix``). It is not
    pinned: the cache may evict it later, as any cached prefix."""
    result = backend.submit(ChainRequest(text, [GenStep(None, SamplingParams(max_new_tokens=0))])).result()
    if result.error is not None:
        raise GenerationError(f"caching the prefix {text[:40]!r}... failed: {result.error}")


# SGLang ``ServerArgs`` keywords and the ``Engine`` option each becomes.
_SGLANG_TO_ENGINE = {
    "random_seed": "seed",
    "max_running_requests": "max_running_requests",
    "max_prefill_tokens": "max_prefill_tokens",
    "chunked_prefill_size": "chunked_prefill_size",
    "page_size": "page_size",
    "device": "device",
    "dtype": "dtype",
    "attention_backend": "attention_backend",
    "disable_radix_cache": "enable_prefix_cache",
    "disable_cuda_graph": "cuda_graphs",
    "enable_torch_compile": "compile_model",
    "mem_fraction_static": "kv_memory",
}
_NEGATED = ("disable_radix_cache", "disable_cuda_graph")
_ATTENTION = {"triton": "triton", "torch_native": "torch", "flashinfer": "auto", "fa3": "auto"}
# Keywords about the HTTP server SGLang's Runtime starts, or its logs: no effect on an embedded engine.
_NO_EFFECT = (
    "log_level", "log_level_http", "log_requests", "host", "port", "launch_timeout", "api_key",
    "served_model_name", "trust_remote_code", "show_time_cost", "enable_metrics", "watchdog_timeout",
    "skip_server_warmup", "enable_cache_report",
)  # fmt: skip
# Keywords the embedded engine takes only at their default (one GPU, the checkpoint as it is).
_DEFAULT_ONLY = {
    "tp_size": 1, "tensor_parallel_size": 1, "dp_size": 1, "data_parallel_size": 1, "pp_size": 1,
    "nnodes": 1, "context_length": None, "tokenizer_path": None, "tokenizer_mode": "auto",
    "load_format": "auto", "quantization": None, "kv_cache_dtype": "auto", "chat_template": None,
    "skip_tokenizer_init": False, "speculative_algorithm": None, "is_embedding": False,
}  # fmt: skip
_PARALLEL = ("tp_size", "tensor_parallel_size", "dp_size", "data_parallel_size", "pp_size", "nnodes")


def sglang_engine_options(
    model: str | None, options: dict[str, Any], caller: str = "Runtime"
) -> dict[str, Any]:
    """``Engine`` options for ``Runtime(**options)`` (``caller``: the class the errors name, also
    SGLang's offline ``Engine``): llmir's own ``Engine`` options as they are,
    SGLang's ``ServerArgs`` keywords translated (``random_seed`` -> ``seed``, ``disable_cuda_graph``
    -> ``cuda_graphs``, ``mem_fraction_static`` -> ``kv_memory`` (here a fraction of the memory
    left after the weights load; ignored on the CPU), ...), keywords about SGLang's server or logs
    dropped, and a typed error for any other (``tp_size > 1``: use an SGLang server)."""
    from llmir_lang.executor.engine import Engine

    own = set(inspect.signature(Engine.__init__).parameters) - {"self", "model"}
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in _NO_EFFECT:
            continue
        if key in _DEFAULT_ONLY:
            _check_default_only(key, value, model, caller)
            continue
        engine_key = _SGLANG_TO_ENGINE.get(key, key)
        if engine_key not in own:
            raise InvalidRequestError(
                f"{caller}() got an unknown option {key!r}; the embedded engine takes {sorted(own)} and "
                f"SGLang's {sorted(_SGLANG_TO_ENGINE)} (and ignores {sorted(_NO_EFFECT)})"
            )
        if engine_key in out:  # two keywords for one option (in either order): which one wins?
            other = next(k for k in options if k != key and _SGLANG_TO_ENGINE.get(k, k) == engine_key)
            raise InvalidRequestError(
                f"{caller}() got both {other!r} and {key!r} (the same option); give one"
            )
        if key in _NEGATED:
            value = not value
        elif key == "dtype" and value == "auto":
            value = None
        elif key == "attention_backend":
            value = _ATTENTION.get(value, value)
        elif key == "mem_fraction_static":
            _check_fraction(value, caller)  # (on any device: a script moved to a GPU must not fail there)
            if _on_cpu(options.get("device")):
                continue  # SGLang's fraction of GPU memory: on the CPU the engine's default applies
        out[engine_key] = value
    return out


def _check_fraction(value: Any, caller: str) -> None:
    """``mem_fraction_static`` is a fraction in (0, 1]: a larger number went to the engine as a
    byte count (``kv_memory=2.0`` is 2 bytes, "too small"), and on the CPU it was dropped unseen."""
    try:  # (a numeric string too, as kv_memory takes '0.5')
        number = (
            float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        )
    except ValueError:
        number = None
    if number is None or not 0 < number <= 1:
        raise InvalidRequestError(
            f"{caller}(mem_fraction_static={value!r}): SGLang's memory fraction is a number in (0, 1] "
            "(0.8 is 80%); give one, or kv_memory= a size ('2GiB')"
        )


def _check_default_only(key: str, value: Any, model: str | None, caller: str) -> None:
    default = _DEFAULT_ONLY[key]
    if value == default or (key == "tokenizer_path" and model is not None and str(value) == str(model)):
        return  # (the tokenizer in the model folder is what the engine loads)
    if key in _PARALLEL:
        raise NotYetSupportedError(
            f"{caller}({key}={value!r}): the embedded engine runs on one GPU; serve the model with "
            "SGLang (python -m sglang.launch_server --model-path ... --tp N) and run programs on it "
            "with llmir.RuntimeEndpoint(url)"
        )
    why = {
        "context_length": "it uses the checkpoint's own context length",
        "tokenizer_path": "it loads the tokenizer from the model folder",
    }.get(key, f"it takes only the default ({default!r})")
    raise NotYetSupportedError(
        f"{caller}({key}={value!r}) is not supported by the embedded engine: {why}; drop it, or serve "
        "the model with SGLang and use llmir.RuntimeEndpoint(url)"
    )


def _on_cpu(device: Any) -> bool:
    from llmir_lang.executor.engine_setup import resolve_device

    return resolve_device(device).type == "cpu"


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def local_model_path(model: str | None) -> str | None:
    """``model`` as a folder the engine can load: a folder as it is, a Hugging Face hub id
    (``meta-llama/Llama-3.2-1B-Instruct``, what SGLang's ``model_path`` often is) from the local
    Hugging Face cache. Nothing is downloaded: a hub id not in the cache is a ``CheckpointError``
    that says how to fetch it."""
    if model is None or Path(model).expanduser().is_dir() or not _HUB_ID.fullmatch(str(model)):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(model), local_files_only=True)
    except Exception:  # not in the cache (or no huggingface_hub): say how to get it
        parent = Path(model).expanduser().parent
        if parent.is_dir():  # "ck/nope" where ./ck is a folder: a path with a typo, not a hub id
            raise CheckpointError(
                f"model folder {str(model)!r} does not exist (the folder {str(parent)!r} does); pass "
                "an existing checkpoint folder, or a Hugging Face hub id that is in the local cache"
            ) from None
        raise CheckpointError(
            f"model {model!r} is neither a local folder nor in the Hugging Face cache; the embedded "
            f"engine downloads nothing: fetch it once (huggingface-cli download {model}) and pass "
            "Runtime(model_path=...) its folder, or the hub id again"
        ) from None


def load_engine(model: str | None, model_path: str | None, options: dict[str, Any], caller: str) -> Any:
    """The executor ``Engine`` of ``caller(model, model_path=..., **options)`` (``Runtime``, or
    SGLang's offline ``Engine``): one model (``model_path`` is SGLang's name for it; a hub id is
    read from the local cache), ``options`` translated by ``sglang_engine_options``."""
    from llmir_lang.executor.engine import Engine

    if model is not None and model_path is not None and str(model) != str(model_path):
        raise InvalidRequestError(f"{caller}() got two models, {model!r} and model_path={model_path!r}")
    given = model if model is not None else model_path
    if given is not None and options.get("tokenizer_path") == given:
        options = {k: v for k, v in options.items() if k != "tokenizer_path"}  # SGLang's default
    path = local_model_path(given)
    return Engine(path, **sglang_engine_options(path, options, caller))


def server_info(engine: Any) -> dict[str, Any]:
    """SGLang's ``get_server_info`` for an embedded engine: the model, device, dtype and context
    length, and the engine's counters."""
    from llmir_lang import __version__

    return {
        "version": __version__,
        "model_path": str(engine.model_path),
        "tokenizer_path": str(engine.model_path),
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "context_length": engine.config.context_len,
        "random_seed": engine.seed,
        "internal_states": engine.stats(),
    }


class Runtime(Backend):
    """The embedded engine as a backend. ``model=None`` is the bundled model (``model_path=`` is
    SGLang's name for it; a Hugging Face hub id is looked up in the local cache); ``options`` go to
    ``Engine`` (``device``, ``dtype``, ``kv_memory``, ``max_running_requests``, ...), and SGLang's
    ``ServerArgs`` keywords are translated (``sglang_engine_options``).

    SGLang's ``url`` / ``endpoint`` have no meaning here: there is no HTTP server."""

    def __init__(self, model: str | None = None, *, model_path: str | None = None, **options: Any) -> None:
        from llmir_lang.executor.backend import EngineBackend

        self.engine = load_engine(model, model_path, options, "Runtime")
        self.backend = EngineBackend(self.engine)
        self._sglang: Any = None  # the SGLang offline engine over self.engine (generate)
        self._sglang_lock = threading.Lock()

    @property
    def shares_prefix_in_batch(self) -> bool:  # type: ignore[override]
        return self.backend.shares_prefix_in_batch

    def submit(self, request: ChainRequest, on_chunk: ChunkCallback | None = None) -> Future:
        return self.backend.submit(request, on_chunk)

    def abort_requests(self, futures: Iterable[Future]) -> None:
        self.backend.abort_requests(futures)

    def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        return self.backend.score(prompt, continuations)

    def score_async(self, prompt: str, continuations: Sequence[str]) -> Future:
        return self.backend.score_async(prompt, continuations)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.backend.apply_chat_template(messages, add_generation_prompt)

    def token_ids(self, text: str) -> list[int] | None:
        return self.backend.token_ids(text)

    def token_text(self, token_id: int) -> str | None:
        return self.backend.token_text(token_id)

    def unpin(self, prompt: str) -> None:
        self.backend.unpin(prompt)

    def stats(self) -> dict[str, Any]:
        return self.backend.stats()

    # --- SGLang's Runtime methods ------------------------------------------------------------
    def flush_cache(self) -> None:
        """Drop every cached prefix that no running request holds."""
        self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        """The model, device, dtype and context length, and the engine's counters."""
        return server_info(self.engine)

    def generate(
        self,
        prompt: str | list[str],
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        lora_path: Any = None,
    ) -> str:
        """SGLang's ``Runtime.generate``: the ``/generate`` answer for ``prompt`` (one text, or a
        list of them for a batch) as a JSON string, exactly what an llmir server answers (see
        ``llmir_lang.server.offline_engine.Engine.generate``). Bad input raises that method's typed
        errors (SGLang's ``Runtime`` returns the server's error body as JSON instead)."""
        answer = self._sglang_engine().generate(
            prompt,
            sampling_params,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            lora_path=lora_path,
        )
        return json.dumps(answer)

    async def async_generate(
        self, prompt: str, sampling_params: dict[str, Any] | None = None
    ) -> AsyncIterator[str]:
        """SGLang's ``Runtime.async_generate`` (also ``add_request``): streams one generation and
        yields the text each event adds (``async for piece in rt.async_generate(prompt, sp)``)."""
        events = await self._sglang_engine().async_generate(prompt, sampling_params, stream=True)
        sent = 0
        async for event in events:
            piece = event["text"][sent:]
            sent += len(piece)
            if piece:
                yield piece

    add_request = async_generate

    def encode(self, prompt: Any) -> NoReturn:
        """SGLang's ``Runtime.encode`` computes embeddings, which llmir_lang does not: refused."""
        from llmir_lang.server.offline_engine import refuse_embeddings

        refuse_embeddings("Runtime.encode")

    def _sglang_engine(self) -> Any:
        if self._sglang is None:
            from llmir_lang.errors import EngineClosedError
            from llmir_lang.executor.engine_loop import CLOSED_MESSAGE
            from llmir_lang.server.offline_engine import Engine

            if self.engine._closed:  # no service loop thread for an engine that is gone
                raise EngineClosedError(CLOSED_MESSAGE)

            with self._sglang_lock:
                if self._sglang is None:
                    self._sglang = Engine.over(self.engine)
        return self._sglang

    def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer.hf

    def cache_prefix(self, prefix: str) -> None:
        """Compute ``prefix``'s KV into the radix cache now (``cache_prefix``)."""
        cache_prefix(self, prefix)

    def shutdown(self) -> None:
        if self._sglang is not None:
            self._sglang.shutdown()
        self.engine.shutdown()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
