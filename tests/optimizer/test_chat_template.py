"""Role markers derived from a tokenizer's own chat template, and canonicalize rendering with them.

The tokenizers are built in the test (a tiny word-level vocabulary plus a Jinja chat template),
so nothing is downloaded.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from llmir_lang.ir import ModuleBuilder
from llmir_lang.ir.semantics import evaluate
from llmir_lang.optimizer import (
    ChatTemplate,
    ChatTemplateError,
    PassManager,
    chat_template_from_tokenizer,
    derive_chat_template,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-3-like: BOS from the template, header blocks, a trimmed content.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen-like: a default system prompt when the conversation has none.
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are kind.<|im_end|>\n{% endif %}"
    + CHATML
)
# Rejects system messages outright.
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
    "[{{ m['role'] }}]{{ m['content'] }}[/{{ m['role'] }}]{% endfor %}"
)


def _tokenizer(template: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))
    tok.chat_template = template
    if bos is not None:
        tok.bos_token = bos
    return tok


def test_chatml_markers() -> None:
    t = chat_template_from_tokenizer(_tokenizer(CHATML))
    for role in ("system", "user", "assistant"):
        assert (t.begin(role), t.end(role)) == (f"<|im_start|>{role}\n", "<|im_end|>\n")
    assert t.prefix == ""


def test_llama3_like_markers_leave_bos_in_the_prefix() -> None:
    t = chat_template_from_tokenizer(_tokenizer(LLAMA3, bos="<s>"))
    assert t.prefix == "<s>"
    assert t.begin("system") == "<|start_header_id|>system<|end_header_id|>\n\n"
    assert t.end("user") == "<|eot_id|>"


def test_default_system_prompt_is_the_prefix() -> None:
    t = chat_template_from_tokenizer(_tokenizer(DEFAULT_SYSTEM))
    assert t.prefix == "<|im_start|>system\nYou are kind.<|im_end|>\n"
    assert t.begin("system") == "<|im_start|>system\n"


def test_template_without_system_role() -> None:
    t = chat_template_from_tokenizer(_tokenizer(NO_SYSTEM))
    assert t.begin("user") == "[user]" and t.end("assistant") == "[/assistant]"
    with pytest.raises(ChatTemplateError, match="no role 'system'"):
        t.begin("system")


@pytest.mark.parametrize(("template", "bos"), [(CHATML, None), (LLAMA3, "<s>"), (DEFAULT_SYSTEM, None)])
def test_canonicalized_program_matches_apply_chat_template(template: str, bos: str | None) -> None:
    tok = _tokenizer(template, bos)
    roles = chat_template_from_tokenizer(tok)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    mb = ModuleBuilder()
    f = mb.function("chat")
    s = f.start()
    for message in conversation:
        s = f.role_end(f.text(f.role_begin(s, message["role"]), message["content"]), message["role"])
    f.ret(s)
    module = PassManager("canonicalize", {"canonicalize": {"template": roles}}).run(mb.build())
    assert all(op.kind != "role.begin" for op in module.functions[0].ops)
    text = evaluate(module, backend=None).get("chat").returned[0].text  # type: ignore[arg-type]
    expected = tok.apply_chat_template(conversation, tokenize=False)
    system_start = expected.index(roles.begin("system"))
    assert text == expected[system_start:]


def test_canonicalize_accepts_a_render_role_callable() -> None:
    mb = ModuleBuilder()
    f = mb.function("f")
    f.ret(f.role_end(f.text(f.role_begin(f.start(), "user"), "x"), "user"))
    render = lambda role, is_begin: f"<{'' if is_begin else '/'}{role}>"  # noqa: E731
    module = PassManager("canonicalize", {"canonicalize": {"template": render}}).run(mb.build())
    assert module.functions[0].ops[1].label == "<user>x</user>"


def test_unknown_role_is_a_clear_error() -> None:
    t = ChatTemplate({"user": ("<u>", "</u>")}, source="fake")
    with pytest.raises(ChatTemplateError, match="of fake has no role 'tool'; roles: user"):
        t.begin("tool")


def test_derive_from_a_plain_render_function() -> None:
    tok = _tokenizer(LLAMA3, bos="<s>")
    t = derive_chat_template(
        lambda messages: tok.apply_chat_template(messages, tokenize=False), bos_token="<s>"
    )
    assert t == chat_template_from_tokenizer(tok)
    with pytest.raises(ChatTemplateError, match="failed on a probe conversation"):
        derive_chat_template(lambda messages: 1 / 0)  # type: ignore[arg-type,return-value]
    with pytest.raises(ChatTemplateError, match="verbatim"):
        derive_chat_template(lambda messages: "no contents here")
