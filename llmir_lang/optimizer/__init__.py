"""The optimizer: named passes over the program IR, run by a ``PassManager`` pipeline string.

Passes (``PASS_REGISTRY``), each ``Module -> Module`` and documented in its module:

- ``canonicalize``   render roles through the chat template, drop empty text, merge adjacent text
- ``prefix-share``   plan prefixes shared across a batch and a fork: prefill once, pin, count users
- ``fork-join``      explicit forks; each fork's branches scheduled together after one prefill
- ``select-trie``    a select's choices scored in one batched extend over a trie of choices
- ``fuse-constants`` gen -> constant text -> gen chains become one engine request (``gen.chain``)

``PassManager(DEFAULT_PIPELINE, options={"canonicalize": {"template": t}}).run(module)``; the
empty pipeline ``""`` returns the module unchanged (the call-by-call baseline). Every annotation a
pass adds is an IR attribute, printed and parsed like any other, and a hint the interpreter may
ignore without changing the program's output.
"""

from __future__ import annotations

from llmir_lang.optimizer import canonicalize as _canonicalize  # noqa: F401  (registers)
from llmir_lang.optimizer import fork_join as _fork_join  # noqa: F401
from llmir_lang.optimizer import fuse_constants as _fuse_constants  # noqa: F401
from llmir_lang.optimizer import prefix_share as _prefix_share  # noqa: F401
from llmir_lang.optimizer import select_trie as _select_trie  # noqa: F401
from llmir_lang.optimizer.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    RoleRenderer,
    chat_template_from_tokenizer,
    derive_chat_template,
)
from llmir_lang.optimizer.pass_manager import (
    DEFAULT_PIPELINE,
    PASS_REGISTRY,
    PassManager,
    PassPipelineError,
    parse_pipeline,
    register_pass,
    run_pipeline,
)

__all__ = [
    "DEFAULT_PIPELINE",
    "PASS_REGISTRY",
    "ChatTemplate",
    "ChatTemplateError",
    "PassManager",
    "PassPipelineError",
    "RoleRenderer",
    "chat_template_from_tokenizer",
    "derive_chat_template",
    "parse_pipeline",
    "register_pass",
    "run_pipeline",
]
