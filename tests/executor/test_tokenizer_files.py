"""The bundled model's tokenizer read without transformers (``tokenizer_files.py``,
``chat_render.py``) against transformers' own: the same ids, text, special tokens, vocabulary
bytes and chat templates, and transformers wherever the files are not the bundled model's."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llmir_lang.executor.chat_render import render_chat
from llmir_lang.executor.constraints import TokenizerInfo
from llmir_lang.executor.tokenizer import Tokenizer
from llmir_lang.executor.tokenizer_files import FileTokenizer, bundled_tokenizer
from llmir_lang.models import TINY_MODEL_DIR

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
TEXTS = [
    "",
    " ",
    "  two  spaces\n\tand a tab\r\n",
    "\n\n\n",
    "Hello, world! The quick brown fox.",
    'JSON: {"name": "Zoë Ångström", "city": "Kraków", "age": 42}',
    "emoji 🙂🚀 CJK 漢字かな交じり文 RTL שלום عربى combining é e\u0301 zero\u200bwidth",
    "\ufeffBOM and \u00a0nbsp and \u2028 line separator",
    "<|endoftext|>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|pad|>more<|endoftext|>tail",
    "<|im_start|",  # a special token cut short is text
    "a" * 300 + " long text through encode_batch " + "b" * 300,
]


@pytest.fixture(scope="module")
def files() -> FileTokenizer:
    tok = bundled_tokenizer(TINY_MODEL_DIR)
    assert tok is not None, "the bundled model's files take the path without transformers"
    return tok


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def pair() -> tuple[Tokenizer, Tokenizer]:
    """(read from the files, loaded by transformers), both the engine's Tokenizer."""
    fast = Tokenizer(TINY_MODEL_DIR)
    assert fast._hf is None, "no transformers tokenizer until one is asked for"
    return fast, Tokenizer(TINY_MODEL_DIR, use_transformers=True)


def _texts() -> list[str]:
    rng = random.Random(5)
    out = list(TEXTS)
    out += ["".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(1, 40))) for _ in range(150)]
    out += [rng.choice(SPECIALS).join(rng.choice(TEXTS[:8]) for _ in range(3)) for _ in range(30)]
    return out


def test_the_backend_is_transformers_to_the_byte(files, hf) -> None:
    assert files.backend_tokenizer.to_str() == hf.backend_tokenizer.to_str()
    assert files.special_tokens_map == hf.special_tokens_map
    assert files.all_special_tokens == hf.all_special_tokens
    assert files.all_special_ids == hf.all_special_ids
    assert (files.eos_token_id, files.bos_token_id, files.bos_token) == (
        hf.eos_token_id,
        hf.bos_token_id,
        hf.bos_token,
    )
    assert len(files) == len(hf) and files.get_vocab() == hf.get_vocab()
    assert {i: (t.content, t.special) for i, t in files.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()
    }
    assert files.chat_template == hf.chat_template
    assert files.clean_up_tokenization_spaces == hf.clean_up_tokenization_spaces
    assert all(files.convert_ids_to_tokens(i) == hf.convert_ids_to_tokens(i) for i in range(len(hf)))
    for text in _texts():
        for special in (False, True):
            assert files.encode(text, special) == hf.encode(text, add_special_tokens=special), text


def test_the_engine_tokenizer_is_the_same_either_way(pair) -> None:
    fast, slow = pair
    for name in ("eos_token_ids", "bos_token_id", "all_special_ids", "skipped_ids", "vocab_size"):
        assert getattr(fast, name) == getattr(slow, name), name
    assert (fast._bos_text, fast._model_vocab, fast.eos_token_id) == (
        slow._bos_text,
        slow._model_vocab,
        slow.eos_token_id,
    )
    assert fast.has_chat_template and slow.has_chat_template
    assert slow._rust_encode is not None and fast._rust_encode is not None
    for text in _texts():
        for special in (False, True):
            assert (
                fast.encode(text, special)
                == slow.encode(text, special)
                == list(slow.hf.encode(text, add_special_tokens=special))
            ), text
    rng = random.Random(7)
    n = fast.vocab_size
    id_lists = [[rng.randrange(n) for _ in range(rng.randrange(1, 24))] for _ in range(300)]
    id_lists += [[0, 1, 2, 3], [1, 500, 2], [3] * 5, []]
    for ids in id_lists:
        for skip in (True, False):
            assert (
                fast.decode(ids, skip)
                == slow.decode(ids, skip)
                == slow.hf.decode(ids, skip_special_tokens=skip)
            )
    assert fast._hf is None, "nothing above needed transformers"


def test_vocabulary_bytes_and_text_offsets_are_the_same(pair) -> None:
    fast, slow = pair
    a = TokenizerInfo.from_hf(fast, vocab_size=4096, eos_token_ids=fast.eos_token_ids)
    b = TokenizerInfo.from_hf(slow.hf, vocab_size=4096, eos_token_ids=slow.eos_token_ids)
    assert a.fingerprint == b.fingerprint and a.token_bytes == b.token_bytes and a.scheme == b.scheme
    assert (
        TokenizerInfo.from_hf(fast).fingerprint == TokenizerInfo.from_hf(slow.hf).fingerprint
    )  # its own EOS
    tf, ts = fast.text_bytes(), slow.text_bytes()
    assert tf is not None and ts is not None
    assert (tf.table, tf.fallback, tf.strip) == (ts.table, ts.fallback, ts.strip)
    assert fast._hf is None


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "Zoë 🙂 漢字\n\ttabs  and  spaces "},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "<|im_end|> inside <|endoftext|>"},
    ],
    [{"role": "user", "content": "x", "extra": [1, 2.5, True, None, {"k": "v"}]}],
    ({"role": "user", "content": "a tuple of messages"},),
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_the_chat_template_renders_as_transformers_does(pair, hf, messages, add_generation_prompt) -> None:
    fast, _ = pair
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert fast.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want
    assert fast._hf is None, "a plain conversation needs no transformers"


# templates that exercise the environment: tojson, namespace, dict, loop controls,
# trim_blocks / lstrip_blocks, the special tokens and content lists
TEMPLATES = [
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content | tojson }}{% endfor %}",
    "{{ messages | tojson(indent=2, sort_keys=True) }}{{ eos_token }}{{ pad_token }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}"
    "{% continue %}{% endif %}[{{ m.content }}]{% endfor %}",
    "{% for m in messages %}\n  {% if m.role %}\n    {{- m.role }}: {{ m.content }}\n  {% endif %}\n{% endfor %}\n",
    "{{ dict(a=1, b=messages | length) | tojson }}{{ dict.fromkeys(['x', 'y']) | tojson }}",
    "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for part in m.content %}{{ part.text }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}>{% endif %}{{ unk_token is defined }}",
]
MESSAGES = [
    {"role": "system", "content": 'sys "quoted" </s> é'},
    {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]},
    {"role": "assistant", "content": "answer", "tool_calls": [{"name": "f", "arguments": {"x": None}}]},
    {"role": "user", "content": "last"},
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_render_chat_is_transformers_environment(hf, template) -> None:
    for agp in (False, True):
        want = hf.apply_chat_template(
            MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=agp
        )
        assert render_chat(template, MESSAGES, agp, hf.special_tokens_map) == want


def test_template_errors_are_transformers_errors(hf) -> None:
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.exceptions import SecurityError

    msgs = [{"role": "user", "content": "x"}]
    cases = [
        ("{{ raise_exception('no ' + messages[0].role) }}", TemplateError),
        ("{% for m in messages %}", TemplateSyntaxError),
        ("{{ messages.append(1) }}", SecurityError),  # the environment is immutable
    ]
    for template, kind in cases:
        with pytest.raises(kind) as want:
            hf.apply_chat_template(msgs, chat_template=template, tokenize=False)
        with pytest.raises(kind) as got:
            render_chat(template, msgs, False, hf.special_tokens_map)
        assert str(got.value) == str(want.value)


def test_what_render_chat_leaves_to_transformers(pair, hf) -> None:
    from pydantic import BaseModel

    class Message(BaseModel):
        role: str
        content: str

    special = hf.special_tokens_map
    template = hf.chat_template
    assert render_chat("{% generation %}x{% endgeneration %}", [{"role": "user"}], False, special) is None
    assert render_chat(template, [], False, special) is None
    assert render_chat(template, [[{"role": "user", "content": "a batch"}]], False, special) is None
    assert render_chat(template, [Message(role="user", content="an object")], False, special) is None
    assert render_chat(None, [{"role": "user", "content": "x"}], False, special) is None
    # a key whose value is None: transformers versions differ (5.17 keeps it, 5.24 drops it)
    assert render_chat(template, [{"role": "user", "content": "x", "name": None}], False, special) is None
    # transformers fills a reasoning field's aliases in before rendering; left to it
    thought = [{"role": "assistant", "content": "ok", "reasoning": "because"}, {"role": "user", "content": "?"}]
    assert render_chat(template, thought, False, special) is None
    with_thought = Tokenizer(TINY_MODEL_DIR)
    assert with_thought.apply_chat_template(thought) == hf.apply_chat_template(
        thought, tokenize=False, add_generation_prompt=True
    )
    # the engine's Tokenizer asks transformers for those, and gets its answer
    fast = Tokenizer(TINY_MODEL_DIR)
    msgs = [Message(role="user", content="an object")]
    assert fast.apply_chat_template(msgs) == hf.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert fast._hf is not None


def test_transformers_loads_on_first_use_and_is_then_in_force() -> None:
    tok = Tokenizer(TINY_MODEL_DIR)
    assert tok._hf is None
    hf = tok.hf
    assert tok.hf is hf and tok.backend_tokenizer is hf.backend_tokenizer
    hf.chat_template = "{% for m in messages %}{{ m.content }}|{% endfor %}"  # a caller's change
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "a|"
    assert tok.encode("Hello world") == list(hf.encode("Hello world"))


def _copy(folder: Path, config: dict | None = None, model_type: str = "llama") -> Path:
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY_MODEL_DIR / name, folder / name)
    cfg = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_only_the_bundled_files_skip_transformers(tmp_path: Path) -> None:
    assert bundled_tokenizer(_copy(tmp_path / "copy")) is not None  # a random checkpoint's files
    config = json.loads((TINY_MODEL_DIR / "tokenizer_config.json").read_text())
    assert bundled_tokenizer(_copy(tmp_path / "edited", {**config, "add_bos_token": True})) is None
    assert bundled_tokenizer(_copy(tmp_path / "qwen", model_type="qwen2")) is None
    extra = _copy(tmp_path / "extra")
    (extra / "special_tokens_map.json").write_text("{}")
    assert bundled_tokenizer(extra) is None
    jinja = _copy(tmp_path / "jinja")
    (jinja / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert bundled_tokenizer(jinja) is None
    assert bundled_tokenizer(tmp_path / "missing") is None
    # and the engine's Tokenizer on such a folder is transformers' from the start
    tok = Tokenizer(jinja)
    assert tok._hf is not None
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False) == "x"


def test_a_copy_of_the_bundled_files_is_the_same_tokenizer(tmp_path: Path) -> None:
    folder = _copy(tmp_path / "ck")
    fast, slow = Tokenizer(folder), Tokenizer(folder, use_transformers=True)
    assert fast._hf is None
    for text in TEXTS:
        assert fast.encode(text) == slow.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert fast.apply_chat_template(msgs) == slow.apply_chat_template(msgs)


def test_role_markers_of_the_bundled_files_are_transformers(files, hf) -> None:
    """``llmir ir`` derives role markers from the bundled files without transformers."""
    from llmir_lang.optimizer import chat_template_from_tokenizer

    ours, want = chat_template_from_tokenizer(files), chat_template_from_tokenizer(hf)
    assert ours == want and ours.source == want.source
    msgs = [{"role": "user", "content": "x"}]
    assert files.apply_chat_template(msgs, tokenize=True) == hf.apply_chat_template(msgs, tokenize=True)
