"""Text offsets of logprob tokens (OpenAI's legacy ``text_offset``): the one-pass computation over
token bytes equals decoding every prefix, for the bundled byte-level tokenizer and a
SentencePiece-style one, on random ids (split and malformed UTF-8, specials), in one call and
fed piece by piece as a stream."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from llmir_lang.executor.tokenizer import Tokenizer
from llmir_lang.models import TINY_MODEL_DIR
from llmir_lang.server.convert import TextOffsets, text_offsets


def by_prefixes(tok: Tokenizer, ids: list[int]) -> list[int]:
    """The definition: token i's offset is the length of the decoded text of ids[:i]."""
    return [len(tok.decode(ids[:i], skip_special_tokens=False)) for i in range(len(ids))]


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory) -> Path:
    from llmir_lang.executor.constraints.testing import train_test_tokenizer

    folder = tmp_path_factory.mktemp("sp_tok")
    hf = train_test_tokenizer("sentencepiece_bpe", 2000, 2_000_000)
    hf.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module", params=["bundled", "sentencepiece"])
def tok(request, sp_folder) -> Tokenizer:
    return Tokenizer(TINY_MODEL_DIR if request.param == "bundled" else sp_folder)


def sequences(tok: Tokenizer, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    n = len(tok.hf)
    table = tok.text_bytes()
    high = [] if table is None else [i for i, b in enumerate(table.table) if len(b) == 1 and b[0] >= 0x80]
    text = " The café costs 3€ — 日本語 ✓, isn't it?  Yes.\n\t"
    out = [tok.encode(text, add_special_tokens=False), tok.encode(text.strip(), add_special_tokens=True)]
    for _ in range(40):
        pool = high if high and rng.random() < 0.3 else range(n)
        out.append([rng.choice(pool) for _ in range(rng.randrange(1, 40))])
    return out


def test_the_tokenizers_decode_is_their_bytes(tok):
    assert tok.text_bytes() is not None  # else every offset decodes prefixes (correct, but quadratic)


@pytest.mark.parametrize("seed", [0, 1])
def test_offsets_equal_prefix_decoding(tok, seed):
    for ids in sequences(tok, seed):
        want = by_prefixes(tok, ids)
        assert text_offsets(tok, ids) == want
        assert text_offsets(tok, ids, base=7, start=3) == [7 + o for o in want[3:]]
        rng = random.Random(len(ids))
        stream, got, i = TextOffsets(tok), [], 0
        while i < len(ids):  # fed in pieces, as a stream's chunks come
            k = rng.randrange(1, 5)
            got += stream.extend(ids[i : i + k])
            i += k
        assert got == want


def test_a_tokenizer_whose_decode_is_not_its_bytes_decodes_prefixes(tok, monkeypatch):
    monkeypatch.setattr(tok, "text_bytes", lambda: None)
    ids = sequences(tok, 3)[0]
    assert text_offsets(tok, ids) == by_prefixes(tok, ids)
