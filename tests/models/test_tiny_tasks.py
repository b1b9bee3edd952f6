"""The synthetic tasks of llmir-tiny, and the shipped checkpoint folder (tokenizer, template, size)."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from llmir_lang.models import TINY_MODEL_DIR, tiny_tasks

KINDS = tiny_tasks.EXTRACTION_KINDS


def _mentions(text: str, key: str, value: object) -> bool:
    """Whether ``text`` states ``value`` in one of the spellings the generators use."""
    if isinstance(value, bool):
        return True  # booleans are phrases ("sold out", "Married: no."), checked in test_booleans_are_stated
    if key == "date":
        y, m, d = (int(p) for p in str(value).split("-"))
        month = tiny_tasks._MONTHS[m - 1]
        return any(
            s in text for s in (str(value), f"{month} {d}, {y}", f"{d} {month} {y}", f"of {month} {y}")
        )
    return re.search(rf"(?<![\w]){re.escape(str(value))}(?![\w])", text) is not None


@pytest.mark.parametrize("kind", KINDS)
def test_generators_are_deterministic_for_a_seed(kind: str) -> None:
    a = [tiny_tasks.make_extraction_example(random.Random(7), kind) for _ in range(3)]
    b = [tiny_tasks.make_extraction_example(random.Random(7), kind) for _ in range(3)]
    assert a == b
    other = tiny_tasks.make_extraction_example(random.Random(8), kind)
    assert other != a[0]
    docs1 = [tiny_tasks.make_training_document(r) for r in [random.Random(3)] for _ in range(20)]
    docs2 = [tiny_tasks.make_training_document(r) for r in [random.Random(3)] for _ in range(20)]
    assert docs1 == docs2


@pytest.mark.parametrize("kind", KINDS)
def test_records_validate_and_texts_hold_the_values(kind: str) -> None:
    rng = random.Random(11)
    schema = tiny_tasks.SCHEMAS[kind]
    assert schema["additionalProperties"] is False
    assert schema["required"] == list(schema["properties"])
    texts = set()
    for _ in range(200):
        text, record = tiny_tasks.make_extraction_example(rng, kind)
        jsonschema.validate(record, schema)
        assert list(record) == list(schema["properties"])  # the JSON key order is the schema order
        for key, value in record.items():
            assert _mentions(text, key, value), (key, value, text)
        line = tiny_tasks.format_record(record)
        assert "\n" not in line and json.loads(line) == record
        assert line == json.dumps(record, separators=(",", ":"))
        texts.add(text)
    assert len(texts) == 200  # no repeats: templates, order and values vary


def test_booleans_are_stated() -> None:
    rng = random.Random(5)
    for _ in range(100):
        text, rec = tiny_tasks.make_extraction_example(rng, "product")
        said_yes = any(p in text for p in ("is in stock", "available now", "In stock: yes"))
        said_no = any(p in text for p in ("out of stock", "sold out", "In stock: no"))
        assert said_yes != said_no and said_yes == rec["in_stock"], text


def test_fresh_texts_hold_unseen_names() -> None:
    # the model must copy names: a test seed's names are almost never in a training-sized sample
    train = {tiny_tasks.make_extraction_example(random.Random(i), "person")[1]["name"] for i in range(3000)}
    rng = random.Random(999_999)
    test = [tiny_tasks.make_extraction_example(rng, "person")[1]["name"] for _ in range(200)]
    assert sum(name in train for name in test) <= 2


def test_extraction_prompt_format() -> None:
    prompt = tiny_tasks.extraction_prompt("Ana Bel is 30.", "person")
    assert prompt == "Text: Ana Bel is 30.\nPerson JSON:\n"
    with pytest.raises(ValueError, match="unknown extraction kind"):
        tiny_tasks.make_extraction_example(random.Random(0), "planet")


def test_qa_sets_answers_and_prompt() -> None:
    rng = random.Random(2)
    seen = set()
    for _ in range(100):
        facts, pairs = tiny_tasks.make_qa_set(rng, "arithmetic", 4)
        assert facts is None
        for q, a in pairs:
            m = re.fullmatch(r"What is (\d+) (\+|-|times) (\d+)\?", q)
            assert m, q
            x, op, y = int(m[1]), m[2], int(m[3])
            assert int(a) == {"+": x + y, "-": x - y, "times": x * y}[op]
        facts, pairs = tiny_tasks.make_qa_set(rng, "facts", 6)
        assert facts
        for q, a in pairs:
            seen.add(a if not a.isdigit() else "int")
            if a == "True":
                # a True statement about a city / job / age is stated word for word in the facts
                m = re.fullmatch(r"Does (.+) live in (.+)\?", q)
                if m:
                    assert f"{m[1]} lives in {m[2]}." in facts
            if a.isdigit():
                name = re.fullmatch(r"How old is (.+)\?", q)[1]
                assert f"{name} is {a} years old." in facts
        _, pairs = tiny_tasks.make_qa_set(rng, "compare", 3)
        assert all(a in ("True", "False") for _, a in pairs)
    assert seen == {"True", "False", "Unknown", "int"}
    prompt = tiny_tasks.few_shot_prompt([("What is 1 + 1?", "2")], "What is 2 + 2?", facts="X lives in Y.")
    assert prompt == "Facts: X lives in Y.\nQ: What is 1 + 1?\nA: 2\nQ: What is 2 + 2?\nA: "


def test_chat_examples_alternate_roles() -> None:
    rng = random.Random(4)
    for _ in range(50):
        msgs = tiny_tasks.make_chat_example(rng)
        roles = [m["role"] for m in msgs if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        text = tiny_tasks.render_chat(msgs)
        assert text.count("<|im_start|>") == len(msgs) == text.count("<|im_end|>")


# --- the shipped checkpoint ---------------------------------------------------------------------
needs_checkpoint = pytest.mark.skipif(
    not (TINY_MODEL_DIR / "tokenizer.json").is_file(), reason="llmir-tiny checkpoint not present"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR))


@needs_checkpoint
def test_shipped_folder_is_small_and_complete() -> None:
    names = {p.name for p in TINY_MODEL_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "tokenizer_config.json" in names
    total = sum(p.stat().st_size for p in TINY_MODEL_DIR.iterdir() if p.is_file())
    assert total <= 25_000_000
    assert (TINY_MODEL_DIR / "model.safetensors").stat().st_size <= 16 * 2**20
    config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] >= 1024
    gen = json.loads((TINY_MODEL_DIR / "generation_config.json").read_text())
    assert len(gen["eos_token_id"]) == 2


@needs_checkpoint
def test_shipped_tokenizer_round_trips(tokenizer) -> None:
    rng = random.Random(21)
    samples = [tiny_tasks.make_training_document(rng) for _ in range(30)]
    samples += [
        "  two spaces,\ttab\n\nnewlines ",
        "héllo wörld 😀 ∑",
        'x{"a":1}  ',
        "<|im_start|>user\nhi<|im_end|>\n",
    ]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # no BOS/EOS is added on its own
    assert tokenizer.encode("Hi", add_special_tokens=True) == tokenizer.encode("Hi", add_special_tokens=False)


@needs_checkpoint
def test_splitting_after_a_space_or_newline_keeps_tokens(tokenizer) -> None:
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert enc("Q: What is 2 + 3?\nA: ") + enc("5\n") == enc("Q: What is 2 + 3?\nA: 5\n")
    prompt = tiny_tasks.extraction_prompt("Ana Bel is 30.", "person")
    record = '{"name":"Ana Bel","age":30}'
    assert enc(prompt) + enc(record) == enc(prompt + record)
    assert enc("12345") == [tokenizer.convert_tokens_to_ids(c) for c in "12345"]  # one token a digit


@needs_checkpoint
def test_shipped_chat_template_matches_render_chat(tokenizer) -> None:
    assert tokenizer.chat_template == tiny_tasks.CHAT_TEMPLATE
    config = json.loads((TINY_MODEL_DIR / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tiny_tasks.CHAT_TEMPLATE
    rng = random.Random(8)
    for _ in range(10):
        msgs = tiny_tasks.make_chat_example(rng)
        for gen_prompt in (False, True):
            got = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
            assert got == tiny_tasks.render_chat(msgs, add_generation_prompt=gen_prompt)
    ids = {
        tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
    }
    assert ids == {0, 1, 2, 3}
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
