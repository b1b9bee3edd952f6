"""IncrementalDecoder: the chunks it emits, step by step, add up to the full decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llmir_lang.executor.tokenizer import IncrementalDecoder, Tokenizer

BUNDLED = Path(__file__).resolve().parents[2] / "llmir_lang" / "models" / "llmir-tiny"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(BUNDLED)


class CountingTokenizer:
    """Wraps a tokenizer and counts decode calls."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.calls = tok, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.calls += 1
        return self.tok.decode(ids, skip_special_tokens)


def stream(dec: IncrementalDecoder, ids: list[int]) -> str:
    out = "".join(dec.step(ids[: i + 1]) for i in range(len(ids)))
    return out + dec.flush(ids)


TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog, again and again and again.",
    'JSON: {"name": "Zoë Ångström", "city": "Kraków", "note": "naïve café"} done',
    "emoji 🙂🚀 and CJK 漢字かな交じり文 mixed with ascii " * 3,
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert stream(IncrementalDecoder(tok), ids) == tok.decode(ids)


def test_random_token_ids_stream_to_the_full_decode(tok):
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert stream(IncrementalDecoder(tok), ids) == tok.decode(ids)


def test_one_decode_call_per_step_while_the_window_grows(tok):
    ids = tok.encode(TEXTS[0] * 4, add_special_tokens=False)
    counting = CountingTokenizer(tok)
    dec = IncrementalDecoder(counting)
    text = "".join(dec.step(ids[: i + 1]) for i in range(len(ids)))
    assert text == tok.decode(ids)
    # one call per step, plus one extra each time the window slides
    slides = len(ids) // (IncrementalDecoder.WINDOW - 3) + 1
    assert counting.calls <= len(ids) + slides


def test_rewritten_tail_is_never_decoded_from_a_stale_cache(tok):
    """Jump-forward may replace tokens and move the offsets; the decoder must follow."""
    a = tok.encode("The answer is forty", add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    got = "".join(dec.step(a[: i + 1]) for i in range(len(a)))
    # the caller re-tokenizes the tail and restarts the decoder after it (as engine_output does)
    b = tok.encode("The answer is forty-two", add_special_tokens=False)
    dec.prefix_offset = dec.read_offset = len(b)
    dec.text = tok.decode(b)
    c = b + tok.encode(" exactly", add_special_tokens=False)
    more = "".join(dec.step(c[: i + 1]) for i in range(len(b), len(c)))
    assert got == tok.decode(a) and dec.text == tok.decode(b) + more
    assert dec.text == tok.decode(c)


def test_encode_through_the_rust_tokenizer_equals_transformers(tok):
    # the engine encodes forced text at every jump-forward through the Rust tokenizer directly;
    # it must give transformers' ids, special tokens and odd text included
    assert tok._rust_encode is not None, "the bundled fast tokenizer passes the probe check"
    rng = random.Random(3)
    texts = [*TEXTS, "<|endoftext|>tail", "<|im_start|>user\nhi<|im_end|>\n", "", " ", "\n\n", '","age":']
    texts += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 30))) for _ in range(200)]
    # long texts go through encode_batch (it releases the GIL): the same ids on both sides of the cut
    from llmir_lang.executor.tokenizer import _LONG_TEXT

    base = "".join(TEXTS) * (1 + 2 * _LONG_TEXT // max(1, len("".join(TEXTS))))
    texts += [base[: _LONG_TEXT - 1], base[:_LONG_TEXT], base[: _LONG_TEXT + 1], base, "<|endoftext|>" + base]
    for text in texts:
        for special in (False, True):
            assert tok.encode(text, special) == list(tok.hf.encode(text, add_special_tokens=special))


def test_encode_falls_back_when_the_wrapper_differs(tok):
    class Shifted:  # a Rust tokenizer whose ids disagree with the wrapper's
        def encode(self, text, add_special_tokens=True):
            class E:
                ids = [1, 2, 3]

            return E()

    assert not tok._same_encode(Shifted())


def test_a_chat_template_that_refuses_the_messages_is_a_typed_error(tok: Tokenizer) -> None:
    """A template's ``raise_exception`` (or any jinja error) reaches a direct caller as the
    project's typed error saying what to send instead, not as jinja2's own exception."""
    from llmir_lang.errors import ChatTemplateRefusedError, InvalidRequestError

    saved = tok.hf.chat_template
    tok.hf.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    try:
        with pytest.raises(ChatTemplateRefusedError, match="refuses these messages: no system role") as info:
            tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}])
        assert isinstance(info.value, InvalidRequestError)
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    finally:
        tok.hf.chat_template = saved
