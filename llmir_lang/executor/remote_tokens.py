"""Token ids for the remote backends' scoring: the prompt and each choice tokenized apart, as the
embedded engine's ``score`` does, with ``tokenizer=`` locally or else with the server's
``/tokenize`` (vLLM's format, which SGLang and llmir share)."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from llmir_lang.errors import EmptyPromptError, InvalidRequestError, NotYetSupportedError
from llmir_lang.executor.remote_errors import RemoteBackendError, _excerpt

# A /tokenize answer that cannot be read (not JSON, of another shape, a 200 that carries an error)
# may be a passing fault (a proxy's error page, a server restarting): scoring goes on without the
# server's tokenization for _TOKENIZE_PAUSE_S, then asks again; only _TOKENIZE_GIVE_UP such
# answers in a row make the backend take the route for one of another format, for good
_TOKENIZE_PAUSE_S = 30.0
_TOKENIZE_GIVE_UP = 3


class _ServerTokens:
    """The token side of a remote backend: ``tokenizer=`` (loaded on first use), the server's
    ``/tokenize``. Needs of the backend: ``_request``, ``_fail``, ``_root`` and ``_lock``."""

    _tokenizer: Any
    _lock: threading.Lock
    _no_tokenize: bool
    _tokenize_failures: int
    _tokenize_paused_until: float
    _tokenize_warned: bool
    _tokenize_fields: dict[str, Any]
    _root: str
    _request: Callable[..., httpx.Response]
    _fail: Callable[[str, httpx.Response], RemoteBackendError]

    def _hf_tokenizer(self) -> Any:
        with self._lock:
            if isinstance(self._tokenizer, str):
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer)
        return self._tokenizer

    def token_ids(self, text: str) -> list[int] | None:
        """With ``tokenizer=``: ``text``'s ids for meta info (no request to the server for it)."""
        if self._tokenizer is None:
            return None
        return list(self._hf_tokenizer().encode(text, add_special_tokens=False))

    def token_text(self, token_id: int) -> str | None:
        if self._tokenizer is None:
            return None
        return self._hf_tokenizer().decode([token_id], skip_special_tokens=False)

    def _token_ids(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]] | None:
        """``texts`` as the served model's tokenizer encodes them: with ``tokenizer=`` locally, else
        with the server's ``/tokenize`` (vLLM's format, which SGLang and llmir share). None when
        neither is available: the server has no ``/tokenize`` route (404 / 405, remembered), or its
        answer could not be read (see ``_unreadable_tokenize``)."""
        if self._tokenizer is not None:
            tok = self._hf_tokenizer()
            return [list(tok.encode(t, add_special_tokens=add_special_tokens)) for t in texts]
        if self._no_tokenize or time.monotonic() < self._tokenize_paused_until:
            return None
        out = []
        for text in texts:
            body = {**self._tokenize_fields, "prompt": text, "add_special_tokens": add_special_tokens}
            r = self._request("POST", self._root + "/tokenize", body)
            if r.status_code == 405 or (r.status_code == 404 and "model" not in r.text.lower()):
                self._no_tokenize = True  # no such route (a 404 about the model is an error)
                return None
            if r.status_code >= 400:
                raise self._fail(self._root + "/tokenize", r)
            try:
                ids = r.json().get("tokens")
            except (ValueError, AttributeError):
                ids = None
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                self._unreadable_tokenize(r)
                return None
            out.append(ids)
        self._tokenize_failures = 0
        return out

    def _unreadable_tokenize(self, r: httpx.Response) -> None:
        """Stop asking ``/tokenize`` for ``_TOKENIZE_PAUSE_S`` after an answer that could not be
        read (for good after ``_TOKENIZE_GIVE_UP`` in a row), and say so once."""
        with self._lock:
            self._tokenize_failures += 1
            if self._tokenize_failures >= _TOKENIZE_GIVE_UP:
                self._no_tokenize = True  # some other /tokenize: not one we can read
            else:
                self._tokenize_paused_until = time.monotonic() + _TOKENIZE_PAUSE_S
            first, self._tokenize_warned = not self._tokenize_warned, True
        if first:
            warnings.warn(
                f"{self._root}/tokenize: HTTP {r.status_code} with an answer that is not a list of token "
                f"ids ({_excerpt(r.text)}); scoring (select) goes on without the server's tokenization "
                f"(a choice whose text merges with the prompt's end is then refused), and asks again in "
                f"{_TOKENIZE_PAUSE_S:g} s, up to {_TOKENIZE_GIVE_UP} such answers in a row; pass "
                "tokenizer=<the model's Hugging Face tokenizer or its path> to the backend to need no /tokenize",
                RuntimeWarning,
                stacklevel=2,
            )

    def _choice_ids(
        self, prompt: str, continuations: Sequence[str]
    ) -> tuple[list[int], list[list[int]]] | None:
        """(prompt ids, ids of each continuation), tokenized apart as the engine's ``score`` does;
        None when no tokenizer is available."""
        prompt_ids = self._token_ids([prompt], add_special_tokens=True)
        if prompt_ids is None:
            return None
        _check_prompt_ids(prompt_ids[0])
        conts = self._token_ids(list(continuations), add_special_tokens=False)
        if conts is None:
            return None
        _check_continuations(continuations, conts)
        return prompt_ids[0], conts


def _check_prompt_ids(ids: list[int]) -> None:
    """The engine's ``score`` refuses a prompt of no tokens (an empty text, no BOS): so do the
    backends, with the same error, instead of asking the server for logprobs it cannot give."""
    if not ids:
        raise EmptyPromptError("score() needs a non-empty prompt")


def _check_continuations(continuations: Sequence[str], ids: list[list[int]]) -> None:
    empty = [c for c, t in zip(continuations, ids) if not t]
    if empty:
        raise InvalidRequestError(f"every continuation must have at least one token; {empty!r} has none")


def _merge_error(base_url: str, choice: str, token: str | None) -> NotYetSupportedError:
    merged = f" into the token {token!r}" if token is not None else ""
    return NotYetSupportedError(
        f"cannot score {choice!r} exactly on {base_url}: joined to the prompt, its text merges with the "
        f"prompt's end{merged}, and the server has no /tokenize to tokenize them apart; pass "
        "tokenizer=<the model's Hugging Face tokenizer or its path> to the backend"
    )
