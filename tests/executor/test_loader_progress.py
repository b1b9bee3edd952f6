"""Loading a sharded checkpoint shows a progress bar on a terminal, and nothing elsewhere."""

from __future__ import annotations

import io
import sys

import pytest

pytest.importorskip("transformers")

from hf_fixtures import build_hf_folder  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from llmir_lang.executor.engine import Engine  # noqa: E402


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _sharded(tmp_path):
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    folder = tmp_path / "sharded"
    build_hf_folder(cfg, folder, max_shard_size="60KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


@pytest.mark.parametrize("terminal", [True, False])
def test_sharded_checkpoint_shows_a_bar_only_on_a_terminal(tmp_path, monkeypatch, terminal):
    folder = _sharded(tmp_path)
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with Engine(str(folder), device="cpu", kv_memory="4MB") as eng:
        assert eng.generate([[1, 2, 3]], {"max_new_tokens": 2, "ignore_eos": True})[0].token_ids
    if terminal:
        assert "Loading checkpoint shards" in err.getvalue()
    else:
        assert "Loading checkpoint shards" not in err.getvalue()
