"""How a tokenizer's decode builds text from each token's bytes (``Tokenizer.text_bytes``)."""

from __future__ import annotations


class TextBytes:
    """The form of a tokenizer's decode (with special tokens kept) that ``Tokenizer.text_bytes``
    found: each token's bytes (its text; a byte-fallback token's one byte), and

    * no ``fallback`` ids (byte-level BPE): the joined bytes decoded as UTF-8 with U+FFFD for each
      malformed part, as Python's ``errors="replace"`` does;
    * ``fallback`` ids (SentencePiece with ``<0xNN>`` tokens): other tokens are text; each run of
      consecutive fallback tokens is its bytes decoded, or one U+FFFD per token where they are not
      valid UTF-8;

    with one leading space of the whole text dropped where ``strip``."""

    __slots__ = ("table", "fallback", "strip")

    def __init__(self, table: list[bytes], fallback: frozenset[int], strip: bool):
        self.table, self.fallback, self.strip = table, fallback, strip

    def text(self, ids: list[int]) -> str:
        """What decode returns for ``ids``, by the rules above."""
        if not self.fallback:
            text = b"".join(self.table[i] for i in ids).decode("utf-8", "replace")
        else:
            parts: list[str] = []
            run: list[int] = []
            for i in [*ids, -1]:
                if i in self.fallback:
                    run.append(i)
                    continue
                if run:
                    parts.append(run_text(b"".join(self.table[t] for t in run), len(run)))
                    run = []
                if i >= 0:
                    parts.append(self.table[i].decode("utf-8", "replace"))
            text = "".join(parts)
        return text[1:] if self.strip and text.startswith(" ") else text


def run_text(data: bytes, tokens: int) -> str:
    """A run of byte-fallback tokens as SentencePiece decodes it: its bytes as UTF-8, or one U+FFFD
    per token where they are not valid."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * tokens
