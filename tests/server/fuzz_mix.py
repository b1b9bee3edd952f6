"""The request mix of the server fuzz (``test_fuzz_server.py``): seeded random requests to
``/generate``, ``/v1/completions`` and ``/v1/chat/completions``, valid (``ok``), invalid (with the
status and the ``param`` their error must have), and clients that leave (``drop``: a long request,
``leave``: a short one)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from server_harness import arithmetic_prompt

from llmir_lang.models.tiny_tasks import SCHEMAS, extraction_items

MODEL = "llmir-tiny"
LIMIT = 960  # the server's --max-tokens-limit
DROP_TOKENS = 900  # what a leaving client asks for: far more than it can get before it leaves

ANSWER_REGEX = "[0-9]+\n"
SMALL_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["answer", "ok"],
    "additionalProperties": False,
}
GBNF = 'root ::= [0-9]+ "\\n"'
CHOICES = ["yes", "no", "maybe"]
STOPS: list[Any] = [None, None, "\n", ["\n"], [" ", "Q"], "Q:", ["2", "\n"], "is 1", ["é", "\u65e5"]]
# text the model continues with multi-byte characters, special tokens, odd spacing
ODD_PROMPTS = ["Once upon a time", "Caf\u00e9 \u00fcber na\u00efve \u65e5\u672c\u8a9e \U0001f642 ", "<|im_start|>user\nHi",
               "  \t spaced\n\n", "Q: What is \u00e9 + 7?\nA: "]  # fmt: skip


@dataclass
class Case:
    """One request of the mix. ``kind``: ``ok`` (compared with the same request alone),
    ``invalid`` (``status``, a 4xx or 501, naming ``param``), ``drop`` (a long request whose client
    leaves: ``how``, ``events`` after that many events, ``timeout`` after that many seconds,
    ``close`` right after sending it, ``half_body`` in the middle of its body) or ``leave`` (a short
    one whose client leaves, before or after it finished)."""

    idx: int
    route: str
    body: dict[str, Any]
    kind: str = "ok"
    status: int = 200
    param: str | None = None
    how: tuple[str, float] | None = None

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


# --- the mix -------------------------------------------------------------------------------
class Mix:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.extractions = [(k, p) for k, p, _ in extraction_items(6, seed)]

    def stop(self) -> Any:
        return self.rng.choice(STOPS)

    def prompt(self) -> str:
        r = self.rng.random()
        if r < 0.75:
            return arithmetic_prompt(self.rng.randrange(60))
        if r < 0.85:
            return self.rng.choice(self.extractions)[1]
        return self.rng.choice(ODD_PROMPTS)

    def messages(self) -> list[dict[str, Any]]:
        i = self.rng.randrange(60)
        msgs: list[dict[str, Any]] = [{"role": "user", "content": f"What is {i} + 7?"}]
        if self.rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": "Answer with a number."})
        if self.rng.random() < 0.2:
            msgs[-1]["content"] = [
                {"type": "text", "text": f"What is {i} + "},
                {"type": "text", "text": "7?"},
            ]
        return msgs

    def case(self, idx: int) -> Case:
        r = self.rng.random()
        route = self.rng.choice(["/generate", "/v1/completions", "/v1/chat/completions"])
        if r < 0.12:
            return self.drop(idx, route)
        if r < 0.18:
            return self.leave(idx, route)
        if r < 0.34:
            return self.invalid(idx, route)
        return Case(idx, route, getattr(self, _BUILDERS[route])(self.rng.random() < 0.4))

    # valid requests ----------------------------------------------------------------------
    def sampling(self, seeded_field: str) -> dict[str, Any]:
        if self.rng.random() < 0.15:  # seeded sampling is reproducible too
            return {"temperature": 0.8, seeded_field: self.rng.randrange(1000)}
        return {"temperature": 0.0}

    def generate(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        sp: dict[str, Any] = {**self.sampling("sampling_seed"), "max_new_tokens": rng.randint(1, 24)}
        if (stop := self.stop()) is not None:
            sp["stop"] = stop
        if rng.random() < 0.1:
            sp["stop_regex"] = [r"\d\n", "never"]
        if rng.random() < 0.15:
            sp["ignore_eos"] = True
        if rng.random() < 0.1:
            sp["skip_special_tokens"] = False
        prompt = self.prompt()
        c = rng.random()
        if c < 0.1:
            sp["regex"] = ANSWER_REGEX
        elif c < 0.18:
            sp["json_schema"] = json.dumps(SMALL_SCHEMA if rng.random() < 0.5 else SCHEMAS["person"])
            sp["max_new_tokens"] = rng.randint(8, 48)
        elif c < 0.22:
            sp["ebnf"] = GBNF
        if rng.random() < 0.1:
            sp["min_new_tokens"] = rng.randint(0, sp["max_new_tokens"])
        body: dict[str, Any] = {"text": prompt, "sampling_params": sp, "stream": stream}
        if rng.random() < 0.3:
            body["return_logprob"] = True
            body["top_logprobs_num"] = rng.randint(0, 3)
            body["logprob_start_len"] = rng.choice([-1, 0, 3])
            body["return_text_in_logprobs"] = rng.random() < 0.5
        if rng.random() < 0.3:
            body["rid"] = f"r{rng.randrange(10**6)}"
        if not stream and rng.random() < 0.2:  # a batch
            n = rng.randint(2, 3)
            body["text"] = [self.prompt() for _ in range(n)]
            body["rid"] = [f"b{rng.randrange(10**6)}-{k}" for k in range(n)]
            if rng.random() < 0.5:
                low = sp.get("min_new_tokens", 1)
                body["sampling_params"] = [
                    dict(sp, max_new_tokens=rng.randint(low, low + 16)) for _ in range(n)
                ]
        return body

    def openai_common(self, body: dict[str, Any], stream: bool, chat: bool) -> None:
        rng = self.rng
        body.update(self.sampling("seed"))
        if (stop := self.stop()) is not None:
            body["stop"] = stop
        if rng.random() < 0.08:
            body["stop_regex"] = r"\d\n"
        if rng.random() < 0.1:
            body["top_p"] = 0.0  # most likely token only, whatever the temperature
        if rng.random() < 0.1:
            body["ignore_eos"] = True
        if rng.random() < 0.08:
            body["skip_special_tokens"] = False
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        c = rng.random()
        if c < 0.06:
            body["guided_regex" if rng.random() < 0.5 else "regex"] = ANSWER_REGEX
        elif c < 0.12:
            body["guided_choice"] = CHOICES
        elif c < 0.16:
            body["guided_grammar" if rng.random() < 0.5 else "ebnf"] = GBNF
        elif c < 0.24:
            if chat or rng.random() < 0.5:
                schema = {"name": "answer", "schema": SMALL_SCHEMA}
                body["response_format"] = (
                    {"type": "json_schema", "json_schema": schema}
                    if rng.random() < 0.7
                    else {"type": "json_object"}
                )
            else:
                body["guided_json"] = SMALL_SCHEMA
            body["max_tokens"] = rng.randint(8, 40)

    @staticmethod
    def logprobs_chance(body: dict[str, Any]) -> float:
        """Constrained requests ask for logprobs more often: jump-forward re-tokenizes their
        output, and a stream's logprobs must follow (they did not)."""
        return 0.6 if any(k in body for k in CONSTRAINTS) else 0.3

    def completions(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {"model": MODEL, "prompt": self.prompt(), "max_tokens": rng.randint(0, 24)}
        self.openai_common(body, stream, chat=False)
        if rng.random() < self.logprobs_chance(body):
            body["logprobs"] = rng.randint(0, 5)
        if not stream and rng.random() < 0.1:
            body["echo"] = True
        if not stream and rng.random() < 0.15:
            body["prompt"] = [self.prompt() for _ in range(rng.randint(2, 3))]
        return body

    def chat(self, stream: bool) -> dict[str, Any]:
        rng = self.rng
        n = rng.randint(1, 24)
        body: dict[str, Any] = {"model": MODEL, "messages": self.messages()}
        body["max_completion_tokens" if rng.random() < 0.3 else "max_tokens"] = n
        self.openai_common(body, stream, chat=True)
        if rng.random() < self.logprobs_chance(body):
            body["logprobs"] = True
            if rng.random() < 0.7:
                body["top_logprobs"] = rng.randint(0, 4)
        return body

    # invalid requests ----------------------------------------------------------------------
    def invalid(self, idx: int, route: str) -> Case:
        if route != "/v1/chat/completions" and self.rng.random() < 0.15:
            return self.invalid_batch(idx, route)
        stream = self.rng.random() < 0.4
        body = getattr(self, _BUILDERS[route])(stream)
        if route == "/generate" and isinstance(body["text"], list):
            body["text"], body["rid"] = body["text"][0], None
            if isinstance(body["sampling_params"], list):
                body["sampling_params"] = body["sampling_params"][0]
        options = _INVALID[route]
        name, mutate, status, param = options[self.rng.randrange(len(options))]
        mutate(body)
        return Case(idx, route, body, "invalid", status, param)

    def invalid_batch(self, idx: int, route: str) -> Case:
        """A batch with one prompt the engine refuses (empty, too long): a 400 naming it; the
        others, submitted already, are aborted."""
        n = self.rng.randint(2, 4)
        bad = self.rng.randrange(n)
        prompts = [self.prompt() for _ in range(n)]
        prompts[bad] = self.rng.choice(["", "7 + " * 700])
        if route == "/generate":
            sp = {"temperature": 0.0, "max_new_tokens": self.rng.randint(1, 24)}
            return Case(idx, route, {"text": prompts, "sampling_params": sp}, "invalid", 400, f"text.{bad}")
        body = {"model": MODEL, "prompt": prompts, "max_tokens": self.rng.randint(1, 24), "temperature": 0.0}
        return Case(idx, route, body, "invalid", 400, f"prompt.{bad}")

    # clients that leave ---------------------------------------------------------------------
    def leave(self, idx: int, route: str) -> Case:
        """A client of a short request that leaves at a random point: before or after its request
        finished (either way it is counted once, and nothing is left running)."""
        stream = self.rng.random() < 0.5
        body = getattr(self, _BUILDERS[route])(stream)
        how = self.rng.choice(["events", "timeout", "close"] if stream else ["timeout", "close"])
        arg = {
            "events": self.rng.randint(0, 3),
            "timeout": self.rng.uniform(0.01, 0.3),
            "close": self.rng.uniform(0, 0.05),
        }[how]
        return Case(idx, route, body, "leave", how=(how, arg))

    def drop(self, idx: int, route: str) -> Case:
        rng = self.rng
        how = rng.choice(["events", "events", "timeout", "timeout", "close", "half_body"])
        stream = how == "events" or (how != "half_body" and rng.random() < 0.4)
        if route == "/generate":
            body: dict[str, Any] = {
                "text": self.prompt(),
                "sampling_params": {"temperature": 0.0, "max_new_tokens": DROP_TOKENS, "ignore_eos": True},
                "stream": stream,
            }
            if not stream and rng.random() < 0.3:
                body["text"] = [self.prompt(), self.prompt()]
        else:
            key = "prompt" if route == "/v1/completions" else "messages"
            body = {
                "model": MODEL,
                key: self.prompt() if key == "prompt" else self.messages(),
                "max_tokens": DROP_TOKENS,
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": stream,
            }
            if rng.random() < 0.3:
                body["logprobs"] = 2 if key == "prompt" else True
        arg = {
            "events": rng.randint(0, 5),
            "timeout": rng.uniform(0.15, 0.3),
            "close": 0.0,
            "half_body": 0.0,
        }[how]
        return Case(idx, route, body, "drop", how=(how, arg))


_BUILDERS = {"/generate": "generate", "/v1/completions": "completions", "/v1/chat/completions": "chat"}


def _set(path: str, value: Any):
    def mutate(body: dict[str, Any]) -> None:
        *outer, last = path.split(".")
        d = body
        for k in outer:
            d = d.setdefault(k, {})
        if value is None:
            d.pop(last, None)
        else:
            d[last] = value

    return mutate


CONSTRAINTS = ("guided_regex", "regex", "guided_json", "json_schema", "guided_choice", "guided_grammar", "ebnf",
                "response_format")  # fmt: skip


def _only(path: str, value: Any):
    """Set the constraint field ``path``, dropping every other constraint of the request."""
    *outer, _ = path.split(".")
    prefix = "".join(k + "." for k in outer)
    return _both(*(_set(prefix + k, None) for k in CONSTRAINTS), _set(path, value))


def _both(*mutations):
    def mutate(body: dict[str, Any]) -> None:
        for m in mutations:
            m(body)

    return mutate


def _drop_stream(body: dict[str, Any]) -> None:
    body.pop("stream", None)
    body.pop("stream_options", None)


_OPENAI_INVALID = [
    ("temperature", _set("temperature", 2.5), 400, "temperature"),
    ("top_p", _set("top_p", 1.5), 400, "top_p"),
    ("negative max_tokens", _both(_set("max_completion_tokens", None), _set("max_tokens", -1)), 400, "max_tokens"),
    ("max_tokens over the limit", _both(_set("max_completion_tokens", None), _set("max_tokens", LIMIT + 1)),
     400, "max_tokens"),
    ("max_tokens string", _set("max_tokens", "8"), 400, "max_tokens"),
    ("empty stop", _set("stop", ""), 400, "stop"),
    ("empty stop_regex", _set("stop_regex", [""]), 400, "stop_regex"),
    ("bad regex", _only("guided_regex", "(["), 400, "guided_regex"),
    ("two constraints", _both(_only("guided_regex", "a"), _set("guided_choice", ["b"])), 400, "guided_choice"),
    ("grammar without a rule", _only("guided_grammar", "root ::= answer"), 400, "guided_grammar"),
    ("n", _set("n", 2), 501, "n"),
    ("logit_bias", _set("logit_bias", {"1": 2.0}), 501, "logit_bias"),
    ("unknown field", _set("frobnicate", 1), 400, "frobnicate"),
    ("presence_penalty", _set("presence_penalty", 3.0), 400, "presence_penalty"),
    ("unknown model", _set("model", "gpt-4o"), 404, "model"),
    ("stream_options without stream", _both(_drop_stream, _set("stream_options", {"include_usage": True})),
     400, "stream_options"),
]  # fmt: skip
_INVALID: dict[str, list[tuple[str, Any, int, str | None]]] = {
    "/generate": [
        ("temperature", _set("sampling_params.temperature", -1.0), 400, "sampling_params.temperature"),
        ("top_p", _set("sampling_params.top_p", 0.0), 400, "sampling_params.top_p"),
        ("negative max", _set("sampling_params.max_new_tokens", -2), 400, "sampling_params.max_new_tokens"),
        ("over the limit", _set("sampling_params.max_new_tokens", LIMIT + 5), 400, "sampling_params.max_new_tokens"),
        ("empty stop", _set("sampling_params.stop", ""), 400, "sampling_params.stop"),
        ("bad regex", _only("sampling_params.regex", "(["), 400, "sampling_params.regex"),
        ("bad schema", _only("sampling_params.json_schema", "{not json"), 400, "sampling_params.json_schema"),
        ("two constraints", _both(_only("sampling_params.regex", "a"), _set("sampling_params.ebnf", GBNF)),
         400, "sampling_params.ebnf"),
        ("grammar without root", _only("sampling_params.ebnf", 'answer ::= "x"'), 400, "sampling_params.ebnf"),
        ("n", _set("sampling_params.n", 3), 501, "sampling_params.n"),
        ("unknown field", _set("sampling_params.max_tokens", 4), 400, "sampling_params.max_tokens"),
        ("wrong type", _set("stream", "yes"), 400, "stream"),
        ("vocabulary", _both(_set("text", None), _set("input_ids", [1, 10**7])), 400, "input_ids"),
        ("logprob_start_len", _both(_set("return_logprob", True), _set("logprob_start_len", 10**5)),
         400, "logprob_start_len"),
        ("too long", _set("text", "7 + " * 700), 400, "text"),
    ],
    "/v1/completions": _OPENAI_INVALID + [
        ("logprobs", _set("logprobs", 21), 400, "logprobs"),
        ("suffix", _set("suffix", "x"), 501, "suffix"),
        ("echo with stream", _both(_set("echo", True), _set("stream", True)), 400, "stream"),
        ("empty prompt", _set("prompt", ""), 400, "prompt"),
        ("too long", _set("prompt", "7 + " * 700), 400, "prompt"),
    ],
    "/v1/chat/completions": _OPENAI_INVALID + [
        ("top_logprobs", _both(_set("logprobs", True), _set("top_logprobs", 30)), 400, "top_logprobs"),
        ("top_logprobs without logprobs", _both(_set("logprobs", False), _set("top_logprobs", 2)),
         400, "top_logprobs"),
        ("no messages", _set("messages", []), 400, "messages"),
        ("bad role", _set("messages", [{"role": "robot", "content": "hi"}]), 400, "messages.0.role"),
        ("schema missing", _only("response_format", {"type": "json_schema"}), 400, "response_format.json_schema"),
        ("tools", _set("tools", [{"type": "function", "function": {"name": "f"}}]), 501, "tools"),
        ("image part", _set("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
         501, None),
    ],
}  # fmt: skip


def n_prompts(case: Case) -> int:
    """The engine requests ``case`` makes (a batch makes one per prompt)."""
    prompt = case.body.get("text", case.body.get("prompt"))
    return len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
