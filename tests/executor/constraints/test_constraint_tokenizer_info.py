"""TokenizerInfo: bytes per token for byte-level BPE and SentencePiece vocabularies."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from llmir_lang.executor.constraints import TokenizerInfo, TokenizerVocabularyError
from llmir_lang.executor.constraints.tokenizer_info import greedy_tokenize

TEXTS = [
    '{"name": "héllo wörld", "n": [1, 2.5e-3, -7], "ok": true}',
    "def f(x):\n    return {'a': x}  # 日本語 😀",
    "  leading spaces and\ttabs\r\n",
    "\x00\x01 control \x7f bytes",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_token_bytes_concatenate_to_the_text(bpe_hf, bpe_info, text):
    ids = bpe_hf.encode(text, add_special_tokens=False)
    assert bpe_info.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_spaces_and_byte_fallback(sp_hf, sp_info, text):
    ids = sp_hf.encode(text, add_special_tokens=False)
    # The normalizer prepends '▁' to the text: the bytes are the text after one space.
    assert sp_info.decode_bytes(ids) == b" " + text.encode("utf-8")
    assert sp_info.scheme == "sentencepiece"


def test_sentencepiece_byte_tokens_are_single_bytes(sp_hf, sp_info):
    vocab = sp_hf.backend_tokenizer.get_vocab()
    assert sp_info.token_bytes[vocab["<0xC3>"]] == b"\xc3"
    assert sp_info.token_bytes[vocab["<0x0A>"]] == b"\n"
    spaced = [t for t in vocab if t.startswith("▁") and len(t) > 1]
    assert spaced and sp_info.token_bytes[vocab[spaced[0]]] == spaced[0].replace("▁", " ").encode()


def test_special_tokens_have_no_bytes_and_eos_is_special(bpe_hf, bpe_info, sp_hf, sp_info):
    assert bpe_info.eos_token_ids == (bpe_hf.eos_token_id,)
    for name in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        tid = bpe_hf.convert_tokens_to_ids(name)
        assert bpe_info.token_bytes[tid] is None and tid in bpe_info.special_ids
    for name in ("<unk>", "<s>", "</s>"):
        assert sp_info.token_bytes[sp_hf.convert_tokens_to_ids(name)] is None
    assert sp_info.eos_token_ids == (sp_hf.convert_tokens_to_ids("</s>"),)


def test_model_vocab_padding_and_eos_override(bpe_hf, bpe_info):
    assert bpe_info.vocab_size == 32064
    assert all(b is None for b in bpe_info.token_bytes[32000:])
    im_end = bpe_hf.convert_tokens_to_ids("<|im_end|>")
    info = TokenizerInfo.from_hf(bpe_hf, eos_token_ids=[0, im_end])
    assert info.eos_token_ids == (0, im_end) and info.vocab_size == 32000
    assert info.fingerprint != bpe_info.fingerprint


def test_vocab_size_smaller_than_tokenizer_is_an_error(bpe_hf):
    with pytest.raises(TokenizerVocabularyError, match="smaller than the tokenizer"):
        TokenizerInfo.from_hf(bpe_hf, vocab_size=100)


def test_raw_tokenizers_object_and_wrapper_with_hf_attribute(bpe_hf, bpe_info):
    raw = TokenizerInfo.from_hf(bpe_hf.backend_tokenizer, eos_token_ids=[0])
    assert raw.token_bytes == bpe_info.token_bytes[:32000]

    class Wrapper:  # the engine's Tokenizer keeps the HF tokenizer in .hf
        hf = bpe_hf

    assert TokenizerInfo.from_hf(Wrapper()).token_bytes == raw.token_bytes


def test_missing_eos_and_unknown_decoder_are_typed_errors():
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    with pytest.raises(TokenizerVocabularyError, match="unsupported tokenizer decoder"):
        TokenizerInfo.from_hf(tok, eos_token_ids=[0])
    with pytest.raises(TokenizerVocabularyError, match="no EOS"):
        TokenizerInfo([b"a", b"b"], eos_token_ids=[])


def test_greedy_tokenize_spells_any_text(sp_info):
    data = "ünïcode ✓ text".encode()
    ids = greedy_tokenize(sp_info, data)
    assert sp_info.decode_bytes(ids) == data
    assert len(ids) < len(data)  # longest match, not byte by byte
