"""Bringing your own Hugging Face checkpoint: config.json variants, weight files, tokenizer files.

Every checkpoint transformers runs loads and matches it (greedy tokens, logprobs); every bad one is
a typed error from ``llmir_lang.errors`` that names what is wrong, never a raw exception or a
silently different model. The checkpoints are tiny random models (hidden 64, 2 layers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_fixtures import COMMON_CONFIG, build_hf_folder, edit_config, greedy_matches
from safetensors.torch import load_file, save_file

from llmir_lang.errors import CheckpointError, InvalidRequestError, UnsupportedArchitectureError
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.loader import load_model
from llmir_lang.executor.model_config import ModelConfig
from llmir_lang.executor.tokenizer import Tokenizer

CPU = torch.device("cpu")
PROMPTS = ([5, 17, 33, 2, 90, 101, 7], [250, 3, 3, 9, 60, 61, 62])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A plain Llama checkpoint (untied, fp32, one model.safetensors): (folder, HF model)."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("byo_llama")
    return folder, build_hf_folder(tf.LlamaConfig(**COMMON_CONFIG), folder)


# ---- checkpoints transformers runs: same model here ----------------------------------------------
def test_qwen3_with_attention_bias_has_an_output_projection_bias(tmp_path) -> None:
    """transformers' Qwen3 puts attention_bias on q/k/v AND o_proj; the loader refused the
    checkpoint ("unexpected ...o_proj.bias")."""
    import transformers as tf

    hf = build_hf_folder(tf.Qwen3Config(**COMMON_CONFIG, head_dim=32, attention_bias=True), tmp_path)
    assert "model.layers.0.self_attn.o_proj.bias" in load_file(str(tmp_path / "model.safetensors"))
    greedy_matches(tmp_path, hf, PROMPTS, 8)


def test_biases_follow_each_familys_rule_not_the_config_field(tmp_path) -> None:
    """transformers' Qwen2 always has q/k/v biases and Mistral never has any, whatever
    ``attention_bias`` says; the loader read the field and refused both checkpoints."""
    import transformers as tf

    q2 = build_hf_folder(tf.Qwen2Config(**COMMON_CONFIG), tmp_path / "qwen2")
    edit_config(tmp_path / "qwen2", attention_bias=False, mlp_bias=True)
    greedy_matches(tmp_path / "qwen2", q2, PROMPTS, 8)
    mis = build_hf_folder(tf.MistralConfig(**COMMON_CONFIG, sliding_window=None), tmp_path / "mistral")
    edit_config(tmp_path / "mistral", attention_bias=True, mlp_bias=True)
    greedy_matches(tmp_path / "mistral", mis, PROMPTS, 8)


def test_a_config_without_architectures_is_read_by_its_model_type(llama, tmp_path) -> None:
    """``LlamaConfig(...).save_pretrained`` writes no "architectures"; transformers' Auto classes go
    by model_type. The loader said "architecture 'llama' is not supported"."""
    folder, hf = llama
    for name, value in (("absent", ...), ("null", None), ("empty", [])):
        ckpt = _copy(folder, tmp_path / name)
        edit_config(ckpt, architectures=value)
        assert ModelConfig.from_folder(ckpt).architecture == "LlamaForCausalLM"
    greedy_matches(tmp_path / "absent", hf, PROMPTS, 8)
    bad = _copy(folder, tmp_path / "gpt2")
    edit_config(bad, architectures=..., model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        ModelConfig.from_folder(bad)


def test_model_safetensors_is_the_checkpoint_not_every_safetensors_file(llama, tmp_path) -> None:
    """transformers reads model.safetensors (else the index's shards) and nothing else; the loader
    also read any other *.safetensors beside it (Mistral's consolidated.safetensors, an adapter)
    and refused the checkpoint for their weights."""
    folder, hf = llama
    ckpt = _copy(folder, tmp_path / "ckpt")
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, str(ckpt / "consolidated.safetensors"))
    save_file({"base_model.lora_A.weight": torch.zeros(2, 2)}, str(ckpt / "adapter_model.safetensors"))
    greedy_matches(ckpt, hf, PROMPTS, 8)


def test_model_safetensors_wins_over_a_shard_index_as_in_transformers(llama, tmp_path) -> None:
    """transformers loads model.safetensors when it exists and only then looks for an index; the
    loader read the index first, so a folder re-saved unsharded over an old sharded save ran the
    old shards (or failed on one that was gone)."""
    folder, hf = llama
    ckpt = _copy(folder, tmp_path / "ckpt")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    greedy_matches(ckpt, hf, PROMPTS, 8)


def test_defaults_for_absent_fields_are_each_familys_transformers_defaults() -> None:
    """Without max_position_embeddings every family got Llama's 2048 (transformers: Mistral
    131072, Qwen2 / Qwen3 32768); without sliding_window a Mistral got no window (transformers'
    MistralConfig: 4096)."""
    base = {k: v for k, v in COMMON_CONFIG.items() if k != "max_position_embeddings"}
    ctx = {
        "LlamaForCausalLM": 2048,
        "MistralForCausalLM": 4096,  # 131072 positions, attention windowed at 4096
        "Qwen2ForCausalLM": 32768,
        "Qwen3ForCausalLM": 32768,
    }
    for arch, want in ctx.items():
        assert ModelConfig.from_dict({**base, "architectures": [arch]}).context_len == want
    mistral = ModelConfig.from_dict({**base, "architectures": ["MistralForCausalLM"]})
    assert (mistral.max_position_embeddings, mistral.sliding_window) == (131072, 4096)
    no_window = ModelConfig.from_dict(
        {**base, "architectures": ["MistralForCausalLM"], "sliding_window": None}
    )
    assert no_window.sliding_window is None and no_window.context_len == 131072


def test_a_bf16_model_is_allocated_in_bf16_not_built_in_fp32_and_cast(tmp_path) -> None:
    """The model was made on the device in fp32 and cast after the weights were in: loading a bf16
    model took its size three times over on the device (fp32 parameters, then the bf16 copy),
    so a GPU that holds the model could run out of memory loading it."""
    import transformers as tf
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes: dict[torch.dtype, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (
                func.__name__.startswith("empty")
                and isinstance(out, torch.Tensor)
                and out.device.type != "meta"
            ):
                self.bytes[out.dtype] = self.bytes.get(out.dtype, 0) + out.numel() * out.element_size()
            return out

    hf = build_hf_folder(tf.Qwen2Config(**COMMON_CONFIG), tmp_path)
    n = sum(p.numel() for p in hf.parameters())
    with Allocations() as seen:
        model = load_model(tmp_path, CPU, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert seen.bytes.get(torch.float32, 0) < 0.05 * 4 * n
    assert seen.bytes.get(torch.bfloat16, 0) <= 1.05 * 2 * n
    # the same values as the checkpoint's, rounded once
    state = hf.state_dict()
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"].to(torch.bfloat16))
    assert torch.equal(
        model.model.layers[1].mlp.down_proj.weight,
        state["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16),
    )


# ---- bad checkpoints: typed errors that say what is wrong ----------------------------------------
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
def test_an_activation_other_than_silu_is_refused(llama, tmp_path, act) -> None:
    """The MLP is SwiGLU: a config with another hidden_act loaded and ran as SiLU, silently another
    model than transformers runs."""
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    edit_config(ckpt, hidden_act=act)
    with pytest.raises(UnsupportedArchitectureError, match=f"hidden_act.*{act}"):
        load_model(ckpt, CPU, torch.float32)
    edit_config(ckpt, hidden_act="swish")  # transformers' other name of SiLU
    load_model(ckpt, CPU, torch.float32)


def test_a_quantized_checkpoint_is_refused_by_name(llama, tmp_path) -> None:
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    edit_config(ckpt, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(UnsupportedArchitectureError, match="quantiz.*gptq"):
        load_model(ckpt, CPU, torch.float32)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float8_e4m3fn])
def test_weights_that_are_not_floats_are_refused(llama, tmp_path, dtype) -> None:
    """Integer or fp8 weights (a quantized checkpoint) were cast to float and run as garbage."""
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"].to(dtype)
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*stored as"):
        load_model(ckpt, CPU, torch.float32)


@pytest.mark.parametrize(
    "field, value",
    [
        ("tie_word_embeddings", "false"),  # bool("false") is True: tied, lm_head dropped
        ("attention_bias", "false"),
        ("mlp_bias", 1),
        ("bos_token_id", "x"),
    ],
)
def test_a_flag_that_is_not_a_boolean_is_refused_by_name(llama, tmp_path, field, value) -> None:
    """These were read with bool(): "false" meant true. transformers refuses them too, and the
    engine then reported a broken *tokenizer* (AutoTokenizer reads config.json)."""
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    edit_config(ckpt, **{field: value})
    with pytest.raises(CheckpointError, match=f"config.json field '{field}'"):
        load_model(ckpt, CPU, torch.float32)


@pytest.mark.parametrize(
    "rope, missing_or_bad",
    [
        ({"rope_type": "linear", "rope_theta": 10000.0}, "factor"),
        ({"rope_type": "linear", "factor": 0, "rope_theta": 10000.0}, "factor"),  # NaN logits
        ({"rope_type": "linear", "factor": "abc", "rope_theta": 10000.0}, "factor"),  # ValueError
        ({"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}, "low_freq_factor"),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 0,
                "rope_theta": 10000.0,
            },
            "original_max_position_embeddings",
        ),
    ],
)
def test_rope_scaling_needs_its_keys(llama, tmp_path, rope, missing_or_bad) -> None:
    """A missing llama3 key was silently given a default (another model than transformers, which
    raises), a zero factor made every logit NaN, a text factor raised a bare ValueError."""
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    edit_config(ckpt, rope_parameters=rope)
    with pytest.raises(CheckpointError, match=f"rope_parameters.{missing_or_bad}"):
        load_model(ckpt, CPU, torch.float32)


def test_llama3_rope_without_its_original_context_takes_max_position_embeddings(tmp_path) -> None:
    """transformers 5 fills a missing llama3 ``original_max_position_embeddings`` in from
    ``max_position_embeddings`` (and runs the model); it was refused here."""
    import transformers as tf

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    config = {**COMMON_CONFIG, "max_position_embeddings": 64}
    hf = build_hf_folder(tf.LlamaConfig(**config, rope_parameters={**rope, "rope_theta": 10000.0}), tmp_path)
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 64
    edit_config(tmp_path, rope_parameters={**rope, "rope_theta": 10000.0})  # saved without the key
    assert (
        "original_max_position_embeddings"
        not in json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    )
    greedy_matches(tmp_path, hf, PROMPTS, 8)


def test_rope_scaling_in_the_transformers_4_layout_still_loads(tmp_path) -> None:
    """The older config.json layout (top-level rope_theta and rope_scaling with "type") is read."""
    import transformers as tf

    hf = build_hf_folder(
        tf.LlamaConfig(**COMMON_CONFIG, rope_scaling={"rope_type": "linear", "factor": 4.0}), tmp_path
    )
    edit_config(
        tmp_path, rope_parameters=..., rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0}
    )
    greedy_matches(tmp_path, hf, PROMPTS, 8)


@pytest.mark.parametrize(
    "index",
    [
        [1, 2],  # TypeError: list indices must be integers
        {"weight_map": ["model.norm.weight"]},  # AttributeError: no .values()
        {"weight_map": {"model.norm.weight": {"file": "a.safetensors"}}},  # unhashable dict
    ],
)
def test_a_malformed_shard_index_is_a_checkpoint_error(llama, tmp_path, index) -> None:
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index.json is corrupt"):
        load_model(ckpt, CPU, torch.float32)


def test_a_sharded_checkpoint_loads(tmp_path) -> None:
    import transformers as tf

    hf = build_hf_folder(tf.Qwen2Config(**COMMON_CONFIG), tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    greedy_matches(tmp_path, hf, PROMPTS, 8)


def test_a_file_given_as_the_model_folder_is_named_a_file(llama) -> None:
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        Engine(str(llama[0] / "config.json"), device="cpu")


def test_a_bin_only_checkpoint_is_told_to_convert(llama, tmp_path) -> None:
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        load_model(ckpt, CPU, torch.float32)


# ---- tokenizer files ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [
        "[0, 2]",  # AttributeError: 'list' object has no attribute 'get'
        '{"eos_token_id": "2"}',  # TypeError comparing str and int
        '{"eos_token_id": [1, "x"]}',
        "{",  # was ignored: the model then ran on past its end-of-turn ids
    ],
)
def test_a_malformed_generation_config_is_a_checkpoint_error(llama, tmp_path, content) -> None:
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text(content)
    with pytest.raises(CheckpointError, match="generation_config.json"):
        Tokenizer(ckpt)


def test_generation_config_eos_lists_are_stop_ids(llama, tmp_path) -> None:
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    (ckpt / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')
    assert Tokenizer(ckpt, [0]).eos_token_ids == [0, 7, 9]


def test_a_folder_without_tokenizer_files_says_so(llama, tmp_path) -> None:
    ckpt = _copy(llama[0], tmp_path / "ckpt")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        Engine(str(ckpt), device="cpu", kv_memory="4MB")


def test_text_with_tokens_the_model_lacks_is_refused_before_the_model_runs(tmp_path) -> None:
    """A tokenizer larger than the model's vocabulary: the prompt's ids indexed past the embedding
    inside the engine step (IndexError on the CPU; a device-side assert on CUDA)."""
    import transformers as tf

    build_hf_folder(tf.LlamaConfig(**{**COMMON_CONFIG, "vocab_size": 260}), tmp_path)
    with Engine(str(tmp_path), device="cpu", kv_memory="4MB") as eng:
        assert len(eng.tokenizer.hf) > eng.config.vocab_size
        with pytest.raises(InvalidRequestError, match="vocab_size 260"):
            eng.generate("the quick brown fox", {"max_new_tokens": 2})
        # text of ids the model has still runs
        ids = eng.tokenizer.encode("a b", add_special_tokens=False)
        assert max(ids) < 260
        assert eng.generate("a b", {"max_new_tokens": 2}).completion_tokens == 2


def test_a_chat_template_file_is_the_chat_template(llama, tmp_path) -> None:
    """transformers 5 saves the template as chat_template.jinja; older checkpoints keep it in
    tokenizer_config.json; without either, roles are a typed error naming both places."""
    folder, _ = llama
    msgs = [{"role": "user", "content": "hi"}]
    assert (folder / "chat_template.jinja").is_file()
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert Tokenizer(folder).apply_chat_template(msgs) == expected
    inline = _copy(folder, tmp_path / "inline")
    template = (inline / "chat_template.jinja").read_text()
    (inline / "chat_template.jinja").unlink()
    tok_cfg = json.loads((inline / "tokenizer_config.json").read_text())
    (inline / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": template}))
    assert Tokenizer(inline).apply_chat_template(msgs) == expected
    (inline / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    plain = Tokenizer(inline)
    assert not plain.has_chat_template
    with pytest.raises(InvalidRequestError, match="chat_template.jinja"):
        plain.apply_chat_template(msgs)


def _save_bos_tokenizer(folder: Path) -> None:
    """A Llama-3-like tokenizer: its post-processor adds BOS, its template writes {{ bos_token }}."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)],
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    hf.save_pretrained(str(folder))


def test_a_rendered_chat_starts_with_one_bos_as_in_transformers(tmp_path) -> None:
    """A template that writes {{ bos_token }} and a tokenizer that adds BOS: encoding the rendered
    chat gave [BOS, BOS, ...] (what the server's chat completions fed the model), where
    transformers' apply_chat_template(tokenize=True) gives one."""
    _save_bos_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "the quick fox"}]
    text = tok.apply_chat_template(msgs)
    assert text.startswith("<|begin_of_text|>")
    reference = tok.hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    reference = (
        reference["input_ids"] if isinstance(reference, dict) or hasattr(reference, "keys") else reference
    )
    assert tok.encode(text) == list(reference)
    assert tok.encode(text)[:2] != [0, 0]
    # plain text still gets its BOS, and text without special tokens is untouched
    assert tok.encode("the quick") == [0, *tok.encode("the quick", add_special_tokens=False)]
    assert tok.encode(text, add_special_tokens=False) == list(reference)


def test_a_checkpoint_without_tokenizer_files_fails_before_its_weights_load(tmp_path, monkeypatch):
    """The engine reads the config and the tokenizer first: a folder without tokenizer files is a
    CheckpointError before any weight is read (it came after the whole weight load)."""
    import shutil

    from llmir_lang.errors import CheckpointError
    from llmir_lang.executor import engine as engine_mod
    from llmir_lang.executor.loader import BUNDLED_MODEL

    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(BUNDLED_MODEL / "config.json", folder / "config.json")
    loads: list[object] = []
    monkeypatch.setattr(engine_mod, "load_model", lambda *a, **k: loads.append(a))
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        engine_mod.Engine(str(folder), device="cpu")
    assert loads == []
