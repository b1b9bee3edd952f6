"""``llmir serve``: parse the command line, load the model, run uvicorn until SIGTERM / SIGINT.

``serve_main(argv) -> int`` is the entry point (``llmir_lang.__main__`` wires it as ``serve``).
Exit codes: 0 after a clean (graceful) shutdown, 2 for bad arguments or a model that cannot load.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from typing import Any

from llmir_lang.errors import LLMIRError
from llmir_lang.server.config import ServerConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmir serve",
        description="Serve a model over HTTP: SGLang /generate, OpenAI /v1/*, and /program (whole programs).",
    )
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled llmir-tiny model)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health"
    )
    p.add_argument(
        "--max-tokens-limit", type=int, default=None, help="most tokens one generation may ask for"
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=8 * 2**20, help="largest request body (default 8 MiB)"
    )
    p.add_argument(
        "--served-model-name", default=None, help="the 'model' name clients use (default: folder name)"
    )
    p.add_argument(
        "--kv-memory", default=None, help="KV cache size: bytes, '512MB', '2GiB' or a fraction of free memory"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get on shutdown; those still running are then aborted (503)",
    )
    p.add_argument(
        "--reasoning-parser",
        default=None,
        metavar="NAME",
        help="split the reasoning off chat completions (message.reasoning_content) and start every "
        "request's constraint after the reasoning, as SGLang's --reasoning-parser: deepseek-r1, "
        "qwen3, ... (llmir_lang.ir.reasoning.FORMATS)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(argv: list[str] | None) -> ServerConfig:
    a = build_parser().parse_args(argv)
    kv: str | float | None = a.kv_memory
    try:  # a bare fraction ("0.5") means that share of free memory, as Engine(kv_memory=0.5)
        if kv is not None and 0 < float(kv) < 1:
            kv = float(kv)
    except ValueError:
        pass
    return ServerConfig(
        model=a.model,
        host=a.host,
        port=a.port,
        api_key=a.api_key,
        max_tokens_limit=a.max_tokens_limit,
        max_request_bytes=a.max_request_bytes,
        served_model_name=a.served_model_name,
        kv_memory=kv,
        device=a.device,
        max_running_requests=a.max_running_requests,
        shutdown_timeout_s=a.shutdown_timeout,
        log_level=a.log_level,
        reasoning_parser=a.reasoning_parser,
    )


def serve_main(argv: list[str] | None = None) -> int:
    """Run the server; returns the process exit code."""
    try:
        config = config_from_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    except LLMIRError as e:
        print(f"llmir serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from llmir_lang.server.app import create_app, load_engine

    try:
        engine = load_engine(config)
    except LLMIRError as e:
        print(f"llmir serve: cannot load the model: {e}", file=sys.stderr)
        return 2
    app = create_app(config, engine, owns_engine=True)
    server = _server_class(uvicorn)(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            # uvicorn cancels what still runs after this; the service aborts it (and answers it)
            # at --shutdown-timeout, so this is only a backstop
            timeout_graceful_shutdown=int(math.ceil(max(0.0, config.shutdown_timeout_s) + _CANCEL_MARGIN_S)),
            access_log=config.log_level == "debug",
        ),
        app=app,
        grace_s=config.shutdown_timeout_s,
    )
    # uvicorn handles SIGTERM/SIGINT (graceful shutdown), then re-raises them to the handlers
    # that were installed before it ran: these no-ops make a graceful shutdown exit with 0
    previous = {sig: signal.signal(sig, _after_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.shutdown()  # idempotent; covers a failed startup (e.g. the port is taken)
    return 0 if server.started else 1


# How long after --shutdown-timeout uvicorn may cancel request tasks: the service aborts the
# requests at the timeout, and their answers (503s, last stream events) need a moment to go out.
_CANCEL_MARGIN_S = 5.0


def _server_class(uvicorn: Any) -> type:
    """uvicorn's server, telling the app's service when shutdown begins, so that requests still
    running at ``--shutdown-timeout`` are aborted and answered (503 ``server_shutting_down``, or a
    last ``abort`` stream event) instead of being cancelled mid-response by uvicorn."""

    class GracefulServer(uvicorn.Server):
        def __init__(self, config: Any, *, app: Any, grace_s: float) -> None:
            super().__init__(config)
            self._llmir_app = app
            self._grace_s = grace_s

        async def shutdown(self, sockets: Any = None) -> None:
            service = getattr(self._llmir_app.state, "service", None)
            if service is not None:
                service.begin_shutdown(self._grace_s)
            await super().shutdown(sockets)

    return GracefulServer


def _after_shutdown(signum: int, frame: object) -> None:
    """The signal was handled already (uvicorn shut down gracefully); nothing is left to do."""


def main() -> None:  # ``python -m llmir_lang.server.cli ...``
    sys.exit(serve_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
