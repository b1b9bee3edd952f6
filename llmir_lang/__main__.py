"""Command line: the IR of a program, running it, batch extraction, the server, benchmarks.

    llmir extract --schema S --input in.jsonl|in.csv --output out.jsonl [...]   (llmir_lang.cli.extract)
    llmir serve --model PATH --host 127.0.0.1 --port 30000                     (llmir_lang.server.cli)
    llmir bench engine|programs|constraints|json|cpu_step|passes [args...]     (llmir_lang.cli.bench)

    python -m llmir_lang ir  path/to/file.py:program [--passes P] [--arg name=value ...]
                             [--model DIR] [--print-after-all]
    python -m llmir_lang run path/to/file.py:program [--passes P] [--arg name=value ...]
                             [--model DIR] [--stream] [--max-tokens N]

``ir`` traces the program (arguments not given stay IR parameters) and needs no model; roles
render through the chat template of ``--model`` (default: the bundled model's, when installed).
``run`` runs it on the embedded engine (``--model``, default the bundled model) and prints the
text, then the variables as JSON. ``--arg`` values are typed as ``ARG_HELP`` says.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from llmir_lang.errors import CheckpointError, LLMIRError

ARG_HELP = """\
--arg NAME=VALUE: a program argument, or a sampling default (max_tokens, temperature, ...).
  A program parameter annotated int, float, bool or str gets VALUE converted to that type (bool:
  true/false, 1/0, yes/no). Any other VALUE is read as JSON when it is JSON (3, 0.5, true, null,
  [1, 2], {"k": 1}, "quoted text") and kept as the raw text otherwise: --arg q='What is 7 + 5?'
  passes the text; --arg q='"42"' passes the text 42 to an unannotated parameter.
"""


def _load_program(target: str) -> Any:
    """``file.py:program``, or ``file.py`` holding exactly one ``@llmir.function``."""
    from llmir_lang.dsl import LMFunction

    path, sep, name = target.rpartition(":")
    if not sep and target.endswith(".py"):
        path, name = target, ""
    elif not sep or not path or not name:
        raise SystemExit(f"error: {target!r} must be written path/to/file.py[:program_name]")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(f"_llmir_cli_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot import {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))
    sys.modules[spec.name] = module  # so that pydantic models and dataclasses in it resolve names
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise SystemExit(f"error: {e.filename or path}, line {e.lineno}: syntax error ({e.msg})") from None
    except Exception as e:  # the file's own code raised while it was imported
        raise SystemExit(f"error: importing {path} raised {type(e).__name__}: {e}") from None
    if not name:
        found = [k for k, v in vars(module).items() if isinstance(v, LMFunction) and not k.startswith("_")]
        if len(found) != 1:
            what = f"{len(found)} programs ({', '.join(found)})" if found else "no @llmir.function"
            raise SystemExit(f"error: {path} has {what}; name one: {path}:program_name")
        name = found[0]
    program = getattr(module, name, None)
    if program is None:
        raise SystemExit(f"error: {path} has no {name!r}")
    return program if isinstance(program, LMFunction) else LMFunction(program)


_CONVERTERS = {"int": int, "float": float, "str": str, "bool": bool}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _arguments(items: list[str], program: Any = None) -> dict[str, Any]:
    """``--arg`` items as keyword arguments, typed as ``ARG_HELP`` says."""
    params = program.signature.parameters if program is not None else {}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --arg {item!r} must be written name=value")
        out[key] = _typed(key, value, params[key].annotation if key in params else None)
    return out


def _typed(key: str, value: str, annotation: Any) -> Any:
    # annotations are strings under `from __future__ import annotations`
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)
    kind = _CONVERTERS.get(name.strip()) if isinstance(name, str) else None
    if kind is str:
        return value
    if kind is bool:
        if value.strip().lower() not in _BOOLS:
            raise SystemExit(f"error: --arg {key}={value!r}: expected a bool (true/false, 1/0, yes/no)")
        return _BOOLS[value.strip().lower()]
    if kind is not None:
        try:
            return kind(value)
        except ValueError:
            raise SystemExit(f"error: --arg {key}={value!r}: expected {name}") from None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _template(model: str | None) -> Any:
    """Role markers of ``model``'s tokenizer (the bundled one by default), or None without one."""
    from llmir_lang.models import TINY_MODEL_DIR
    from llmir_lang.optimizer import chat_template_from_tokenizer

    folder = Path(model) if model else TINY_MODEL_DIR
    if not (folder / "tokenizer_config.json").is_file():
        if model:  # asked for by name: rendering without its template would silently be wrong
            what = "no such folder" if not folder.is_dir() else "it has no tokenizer_config.json"
            raise CheckpointError(f"--model {model!r}: {what}; give a checkpoint folder with its tokenizer")
        return None
    from transformers import AutoTokenizer

    return chat_template_from_tokenizer(AutoTokenizer.from_pretrained(str(folder)))


def cmd_ir(ns: argparse.Namespace) -> int:
    from llmir_lang.ir import print_ir
    from llmir_lang.optimizer import DEFAULT_PIPELINE, PassManager

    program = _load_program(ns.target)
    template = _template(ns.model)
    module = program.trace(**_arguments(ns.arg, program))
    passes = ns.passes if ns.passes is not None else program.passes or DEFAULT_PIPELINE
    manager = PassManager(passes, {"canonicalize": {"template": template}} if template else None)
    print("// IR before the pipeline")
    print(print_ir(module), end="")
    steps = manager.trace(module)
    shown = steps if ns.print_after_all else steps[-1:]
    for name, after in shown:
        print(f"\n// IR after {name}" if ns.print_after_all else f"\n// IR after {passes!r}")
        print(print_ir(after), end="")
    if not steps:
        print("\n// the pipeline is empty: the IR is unchanged")
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    from llmir_lang.dsl import Runtime

    program = _load_program(ns.target)
    kwargs: dict[str, Any] = _arguments(ns.arg, program)
    if ns.max_tokens is not None:
        kwargs["max_tokens"] = ns.max_tokens
    with Runtime(ns.model) as rt:
        state = program.run(backend=rt, passes=ns.passes, stream=ns.stream, **kwargs)
        if ns.stream:
            for chunk in state.text_iter():
                print(chunk, end="", flush=True)
            print()
            if state.error() is not None:
                raise state.error()
        else:
            print(state.text())
        print(json.dumps(state.variables(), indent=2, default=str))
        print(json.dumps(state.run_stats()))
    return 0


_PASS_THROUGH = {
    "serve": "run the HTTP server (llmir serve --help for its options)",
    "bench": "run a benchmark of benchmarks/ (llmir bench NAME [args...])",
}


def _parser() -> argparse.ArgumentParser:
    from llmir_lang.cli.extract import add_arguments as add_extract_arguments

    parser = argparse.ArgumentParser(prog="llmir", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ir,run,extract,serve,bench}")
    for name, help_text in (("ir", "print the IR before and after the pipeline"), ("run", "run the program")):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=ARG_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "target", help="path/to/file.py[:program] (the name may be left out when there is one)"
        )
        p.add_argument("--passes", default=None, help="pass pipeline ('' = none); default: the program's")
        p.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE", help="a program argument")
        p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    sub.choices["ir"].add_argument(
        "--print-after-all", action="store_true", help="print the IR after each pass"
    )
    sub.choices["run"].add_argument("--stream", action="store_true", help="print the text as it is generated")
    sub.choices["run"].add_argument("--max-tokens", type=int, default=None, help="default max_tokens of gens")
    add_extract_arguments(sub.add_parser("extract", help="batch structured extraction to JSON lines"))
    for name, help_text in _PASS_THROUGH.items():  # listed here; their own parsers read the arguments
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] == "serve":
            from llmir_lang.server.cli import serve_main

            return serve_main(args[1:])
        if args and args[0] == "bench":
            from llmir_lang.cli.bench import bench_main

            return bench_main(args[1:])
        ns = _parser().parse_args(args)
        if ns.command == "extract":
            from llmir_lang.cli.extract import run_main

            return run_main(ns)
        return cmd_ir(ns) if ns.command == "ir" else cmd_run(ns)
    except LLMIRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside a command that reports its own progress
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmir run ... | head -1`: the reader left; end quietly, as Unix tools do
        # stdout's buffer still holds text for the closed pipe: point it at /dev/null, so the flush
        # at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
