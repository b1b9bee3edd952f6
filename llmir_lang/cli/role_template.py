"""The role markers ``llmir ir`` renders roles with: the chat template of ``--model``'s tokenizer
(the bundled model's by default), and the one-line form of the errors the command prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmir_lang.errors import CheckpointError


def one_line(error: BaseException | str) -> str:
    """An error's message on one line (a message of several lines joined with ' / ')."""
    lines = [line.strip() for line in str(error).splitlines()]
    return " / ".join(line for line in lines if line)


def template_folder(model: str | None) -> Path | None:
    """The folder whose tokenizer renders roles: ``model`` (checked now, before the program is
    traced), the bundled model's by default, or None when there is none."""
    from llmir_lang.models import TINY_MODEL_DIR

    folder = Path(model) if model else TINY_MODEL_DIR
    if not (folder / "tokenizer_config.json").is_file():
        if model:  # asked for by name: rendering without its template would silently be wrong
            what = "no such folder" if not folder.is_dir() else "it has no tokenizer_config.json"
            raise CheckpointError(f"--model {model!r}: {what}; give a checkpoint folder with its tokenizer")
        return None
    return folder


def role_template(folder: Path | None, model: str | None, needed: bool) -> Any:
    """Role markers of ``folder``'s tokenizer, or None without one. ``needed``: the program has
    roles (without them a tokenizer without a chat template is no error). Loaded only when the
    program has roles or ``--model`` names the folder (a broken checkpoint is then reported)."""
    from llmir_lang.optimizer import ChatTemplateError, chat_template_from_tokenizer

    if folder is None or not (needed or model):
        return None
    from llmir_lang.executor.tokenizer_files import bundled_tokenizer

    try:
        # the bundled model's files need no transformers (1.5 s of start-up): tokenizer_files.py
        tokenizer = bundled_tokenizer(folder)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # a corrupt tokenizer_config.json, missing tokenizer files, ...
        raise CheckpointError(
            f"--model {str(model or folder)!r}: its tokenizer does not load ({type(e).__name__}: "
            f"{one_line(e)}); give a checkpoint folder with a complete tokenizer"
        ) from None
    try:
        return chat_template_from_tokenizer(tokenizer)
    except ChatTemplateError as e:
        if not needed:
            return None
        raise ChatTemplateError(
            f"{e}; the program has roles: give --model a checkpoint whose tokenizer has a chat template"
        ) from None
