"""Runtime(model_path=...): a local folder, or a Hugging Face hub id from the local cache."""

from __future__ import annotations

import pytest


def test_a_model_path_with_a_typo_is_named_a_missing_folder_not_a_hub_id(tmp_path, monkeypatch):
    """``ck/nope`` where ``./ck`` is a folder is a path with a typo: the error says the folder does
    not exist (it used to talk about the Hugging Face cache); an id whose first part is no local
    folder is still looked up as a hub id."""
    from llmir_lang.dsl.runtime import local_model_path
    from llmir_lang.errors import CheckpointError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    with pytest.raises(CheckpointError, match=r"model folder 'ck/nope' does not exist"):
        local_model_path("ck/nope")
    with pytest.raises(CheckpointError, match=r"Hugging Face cache"):
        local_model_path("someorg/some-model-not-cached")
