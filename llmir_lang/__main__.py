"""Command line: the IR of a program, running it, batch extraction, the server, benchmarks.

    llmir extract --schema S --input in.jsonl|in.csv --output out.jsonl [...]   (llmir_lang.cli.extract)
    llmir serve --model PATH --host 127.0.0.1 --port 30000                     (llmir_lang.server.cli)
    llmir bench engine|programs|constraints|json|cpu_step|passes|startup [args...]  (llmir_lang.cli.bench)

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
import inspect
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from llmir_lang.cli.process_exit import shorten_teardown
from llmir_lang.cli.role_template import one_line as _one_line
from llmir_lang.cli.role_template import role_template as _template
from llmir_lang.cli.role_template import template_folder as _template_folder
from llmir_lang.errors import LLMIRError, ProgramError

ARG_HELP = """\
--arg NAME=VALUE (repeatable): a program argument, or a sampling default (max_tokens,
  temperature, ...). The item is split at its first '=', and VALUE is read as follows:
  - a program parameter annotated int, float, bool or str: VALUE converted to that type (bool:
    true/false, 1/0, yes/no; str: VALUE exactly as written, never read as JSON);
  - any other NAME (an unannotated parameter, a sampling default): VALUE is read as JSON when
    it is JSON (3, 0.5, true, null, [1, 2], {"k": 1}, "quoted text"), else kept as the text.
  So for an unannotated parameter q, --arg q=3 passes the int 3 (and q=true the bool True), not
  text: to pass the text 3, make VALUE a JSON string, in double quotes the shell keeps:
  --arg 'q="3"' (or --arg q='"3"'), or annotate the parameter `q: str`. The shell splits words at
  spaces before llmir sees them, so quote an item with spaces as one word:
  --arg 'q=What is 7 + 5?' (text: not JSON), --arg 'items=[1, 2]' (JSON: a list).
"""
ARG_RULE = (
    "how --arg reads VALUE: converted by the parameter's int/float/bool/str annotation, else JSON "
    "when it is JSON, else text (see --help)"
)


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
    except SystemExit as e:  # sys.exit() or argparse at the file's top level: not a program's exit
        raise SystemExit(
            f"error: importing {path} called sys.exit({e.code!r}); keep a program file's script code "
            'under `if __name__ == "__main__":`'
        ) from None
    except Exception as e:  # the file's own code raised while it was imported
        raise SystemExit(f"error: importing {path} raised {type(e).__name__}: {_one_line(e)}") from None
    if not name:
        found = [k for k, v in vars(module).items() if isinstance(v, LMFunction) and not k.startswith("_")]
        if len(found) != 1:
            what = f"{len(found)} programs ({', '.join(found)})" if found else "no @llmir.function"
            raise SystemExit(f"error: {path} has {what}; name one: {path}:program_name")
        name = found[0]
    program = getattr(module, name, None)
    if program is None:
        raise SystemExit(f"error: {path} has no {name!r}")
    if isinstance(program, LMFunction):
        return program
    if not inspect.isfunction(program):  # a class, a model, a constant: not something to trace
        what = "a class" if inspect.isclass(program) else f"the {type(program).__name__} {program!r:.40}"
        raise SystemExit(
            f"error: {path}:{name} is not a program (it is {what}); name a function decorated with "
            "@llmir.function"
        )
    try:  # a plain `def f(s, ...)` is taken as a program, as @llmir.function would take it
        return LMFunction(program)
    except LLMIRError as e:
        raise SystemExit(
            f"error: {path}:{name} is not an @llmir.function, and as a plain function it is not a "
            f"program either: {_one_line(e)}"
        ) from None


_CONVERTERS = {"int": int, "float": float, "str": str, "bool": bool}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _arguments(items: list[str], program: Any = None) -> dict[str, Any]:
    """``--arg`` items as keyword arguments, typed as ``ARG_HELP`` says."""
    params = program.signature.parameters if program is not None else {}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(
                f"error: --arg {item!r} must be written NAME=VALUE, as one shell word: quote it when "
                "VALUE has spaces (--arg 'q=What is 7 + 5?')"
            )
        out[key] = _typed(key, value, params[key].annotation if key in params else None)
    return out


def _json_note(items: list[str], program: Any) -> str:
    """For an error of the program: which ``--arg`` values of unannotated parameters were read
    as JSON into something other than text (``--arg q=3`` is the int 3), and how to pass text."""
    params = program.signature.parameters
    notes = []
    for item in items:
        key, _, value = item.partition("=")
        if key not in params or _converter(params[key].annotation) is not None:
            continue
        read = _typed(key, value, None)
        if not isinstance(read, str):
            what = "None" if read is None else f"the {type(read).__name__} {read!r}"
            text = shlex.quote(f"{key}={json.dumps(value, ensure_ascii=False)}")
            notes.append(
                f"--arg {shlex.quote(item)} was read as JSON, so {key} is {what}, not text; to pass the "
                f"text {value}, write --arg {text}, or annotate the parameter `{key}: str`"
            )
    return f" (note: {'; '.join(notes)}; see --help for how --arg values are read)" if notes else ""


def _converter(annotation: Any) -> Any:
    """``int`` / ``float`` / ``bool`` / ``str`` for a parameter annotated with one of them
    (or its name, as ``from __future__ import annotations`` keeps it), else None."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)
    return _CONVERTERS.get(name.strip()) if isinstance(name, str) else None


def _typed(key: str, value: str, annotation: Any) -> Any:
    kind = _converter(annotation)
    if kind is str:
        return value
    if kind is bool:
        if value.strip().lower() not in _BOOLS:
            raise SystemExit(
                f"error: --arg {key}={value!r}: expected a bool (true/false, 1/0, yes/no), as the "
                f"parameter {key} is annotated bool; e.g. --arg {key}=true"
            )
        return _BOOLS[value.strip().lower()]
    if kind is not None:
        try:
            return kind(value)
        except ValueError:
            example = "3" if kind is int else "0.5"
            raise SystemExit(
                f"error: --arg {key}={value!r}: expected {kind.__name__}, as the parameter {key} is "
                f"annotated {kind.__name__}; e.g. --arg {key}={example} ({ARG_RULE})"
            ) from None
    try:
        return json.loads(value)
    except ValueError:
        return value


# What the message of an error raised by Python code working on a traced parameter holds: the
# placeholder's type name, or its private-use mark (int(n): invalid literal '\ue000{n}\ue001').
_PLACEHOLDER_SIGNS = ("TracedText", "Concat", "\ue000", "\\ue000")


def _placeholder_note(reads: list[str]) -> str:
    names = ", ".join(f"{{{r}}} for s[{r!r}]" for r in reads)
    return (
        f"// traced without running the model: generated values read as placeholder texts ({names}), "
        "so Python code on them (if, int(), loops) followed one path; `llmir run` runs every segment\n"
    )


def cmd_ir(ns: argparse.Namespace) -> int:
    from llmir_lang.ir import print_ir
    from llmir_lang.ir.ops import ROLE_BEGIN, ROLE_END, VAR
    from llmir_lang.optimizer import DEFAULT_PIPELINE, PassManager

    program = _load_program(ns.target)
    kwargs = _arguments(ns.arg, program)
    hint = ""  # added to an error the program's own code raised while it was traced
    try:
        folder = _template_folder(ns.model)
        # the program's own pipeline when --passes is not given, "" (none) included, as `run` does
        passes = ns.passes if ns.passes is not None else program.passes
        passes = DEFAULT_PIPELINE if passes is None else passes
        PassManager(passes)  # a bad pipeline is reported before the program is traced
        unbound = [n for n in program.arg_names if n not in kwargs and n not in program.bound]
        if unbound:  # for an error the program's code raised on a placeholder (range(n), int(n))
            hint = (
                f" (traced without --arg for {', '.join(unbound)}: a parameter not given is traced as a "
                "text placeholder; give --arg NAME=VALUE for one the program computes with)"
            )
        module = program.trace(**kwargs)
        hint = ""
        roles = any(op.kind in (ROLE_BEGIN, ROLE_END) for fn in module.functions for op in fn.ops)
        template = _template(folder, ns.model, roles)
        manager = PassManager(passes, {"canonicalize": {"template": template}} if template else None)
        steps = manager.trace(module)
        out = ["// IR before the pipeline\n", print_ir(module)]
        reads = sorted({op.label for fn in module.functions for op in fn.ops if op.kind == VAR and op.label})
        if reads:  # the trace did not run the model: Python code on a read value saw a placeholder
            out.insert(1, _placeholder_note(reads))
        for name, after in steps if ns.print_after_all else steps[-1:]:
            out.append(f"\n// IR after {name}\n" if ns.print_after_all else f"\n// IR after {passes!r}\n")
            out.append(print_ir(after))
        if not steps:
            out.append("\n// the pipeline is empty: the IR is unchanged\n")
    except LLMIRError as e:  # one line, whatever the message (a program's exception may have several)
        from llmir_lang.dsl.errors import ProgramExecutionError

        message = _one_line(e)
        if isinstance(e, ProgramExecutionError) and any(k in message for k in _PLACEHOLDER_SIGNS):
            message += hint
        if isinstance(e, ProgramError):
            message += _json_note(ns.arg, program)
        print(f"error: {message}", file=sys.stderr)
        return 1
    text = "".join(out)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        # IR is ASCII but for value names (a parameter named café): say so, not a traceback
        print(
            f"error: the IR holds a value name that standard output's encoding ({encoding}) cannot "
            "write; run with PYTHONIOENCODING=utf-8",
            file=sys.stderr,
        )
        return 1
    sys.stdout.write(text)
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    from llmir_lang.dsl import Runtime

    program = _load_program(ns.target)
    kwargs: dict[str, Any] = _arguments(ns.arg, program)
    if ns.max_tokens is not None:
        kwargs["max_tokens"] = ns.max_tokens
    try:
        with Runtime(ns.model) as rt:
            state = program.run(backend=rt, passes=ns.passes, stream=ns.stream, **kwargs)
            if ns.stream:
                try:
                    for chunk in state.text_iter():
                        print(chunk, end="", flush=True)
                    print()
                except BaseException:  # the reader left (`| head -1`), or Ctrl-C: stop the
                    state.cancel()  # program and let it end before the engine and the process do
                    state.sync()
                    raise
                if state.error() is not None:
                    raise state.error()
            else:
                print(state.text())
            print(json.dumps(state.variables(), indent=2, default=str))
            print(json.dumps(state.run_stats()))
    except ProgramError as e:  # a value --arg read as JSON may be why: say so
        print(f"error: {e}{_json_note(ns.arg, program)}", file=sys.stderr)
        return 1
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
        p.add_argument(
            "--arg",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a program argument or sampling default (repeatable); VALUE is read as said below",
        )
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


def _parse_args(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
    """``parser.parse_args(args)``; words left over after an ``--arg`` are most often the rest of
    a value with spaces that the shell split, which the error then says."""
    ns, extra = parser.parse_known_args(args)
    if extra:
        hint = ""
        if getattr(ns, "arg", None):
            hint = (
                "; the shell splits an unquoted --arg value at its spaces: quote the whole item as "
                "one word, --arg 'q=What is 7 + 5?'"
            )
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return ns


def main(argv: list[str] | None = None) -> int:
    """``argv`` None: the process's own command line (the ``llmir`` script, ``python -m
    llmir_lang``), whose process ends when this returns: its teardown is shortened then."""
    code = _main(argv)
    if argv is None:
        shorten_teardown()
    return code


def _main(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] == "serve":
            from llmir_lang.server.cli import serve_main

            return serve_main(args[1:])
        if args and args[0] == "bench":
            from llmir_lang.cli.bench import bench_main

            return bench_main(args[1:])
        ns = _parse_args(_parser(), args)
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
