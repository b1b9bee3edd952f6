"""Checkpoints a user brings that transformers loads one way and the engine read another: tied
output layers that are not tied in the weights, Qwen3 without ``head_dim``, Qwen2 / Qwen3 sliding
windows, rope scaling types the engine does not implement. transformers (the installed version,
from the same folder) is the oracle. Tiny random models (hidden 64, 2 layers).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hf_fixtures import COMMON_CONFIG, build_hf_folder, edit_config, greedy_matches
from safetensors.torch import load_file, save_file

from llmir_lang.errors import UnsupportedArchitectureError
from llmir_lang.executor.engine import Engine
from llmir_lang.executor.model_config import ModelConfig

PROMPTS = ([5, 17, 33, 2, 90, 101, 7], [250, 3, 3, 9, 60, 61, 62])


def _hf_from(folder: Path):
    """What transformers makes of the folder as it is now (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _rewrite_weights(folder: Path, change) -> None:
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
    import transformers as tf

    folder = tmp_path_factory.mktemp("untied_llama")
    build_hf_folder(tf.LlamaConfig(**COMMON_CONFIG), folder)
    return folder


# ---- tied embeddings against the weights ------------------------------------------------------
def test_a_tied_config_with_its_own_lm_head_runs_that_lm_head(untied_llama, tmp_path) -> None:
    """config.json says tie_word_embeddings but the weights hold an lm_head.weight that differs from
    the embedding: transformers keeps them apart (with a warning) and runs the checkpoint's
    lm_head; the loader dropped it and ran the embedding as the output layer, another model."""
    ckpt = shutil.copytree(untied_llama, tmp_path / "ckpt")
    edit_config(ckpt, tie_word_embeddings=True)
    hf = _hf_from(ckpt)
    head = load_file(str(ckpt / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(hf.lm_head.weight, head)
    assert not torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight)
    greedy_matches(ckpt, hf, PROMPTS, 6)


def test_a_tied_config_with_an_equal_lm_head_stays_tied(untied_llama, tmp_path) -> None:
    """Both weights saved with the same values (torch .bin habits, some exporters): one tensor."""
    ckpt = shutil.copytree(untied_llama, tmp_path / "ckpt")
    edit_config(ckpt, tie_word_embeddings=True)
    _rewrite_weights(ckpt, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    with Engine(str(ckpt), device="cpu", kv_memory="4MB") as eng:
        assert eng.config.tie_word_embeddings
        assert not hasattr(eng.model, "lm_head")
    greedy_matches(ckpt, _hf_from(ckpt), PROMPTS, 6)


def test_a_tied_checkpoint_that_stores_only_lm_head_uses_it_as_the_embedding(tmp_path) -> None:
    """Tied weights saved under the output layer's name only: transformers ties them from the one
    that is there; the loader refused the checkpoint (missing model.embed_tokens.weight)."""
    import transformers as tf

    built = build_hf_folder(tf.Qwen2Config(**{**COMMON_CONFIG, "tie_word_embeddings": True}), tmp_path)
    _rewrite_weights(tmp_path, lambda s: s.update({"lm_head.weight": s.pop("model.embed_tokens.weight")}))
    hf = _hf_from(tmp_path)
    assert torch.equal(hf.model.embed_tokens.weight, built.model.embed_tokens.weight)
    greedy_matches(tmp_path, hf, PROMPTS, 6)


# ---- head_dim and sliding windows as each family defaults them ------------------------------------
def test_qwen3_without_head_dim_has_qwen3s_default_head_dim(tmp_path) -> None:
    """Qwen3Config's head_dim defaults to 128, not hidden_size // heads: a config.json without it
    loads in transformers and was refused here ("q_proj.weight has shape (512, 64), config.json
    implies (64, 64)")."""
    import transformers as tf

    build_hf_folder(tf.Qwen3Config(**COMMON_CONFIG, head_dim=128), tmp_path)
    edit_config(tmp_path, head_dim=...)
    hf = _hf_from(tmp_path)
    assert hf.config.head_dim == 128
    assert ModelConfig.from_folder(tmp_path).head_dim == 128
    greedy_matches(tmp_path, hf, PROMPTS, 6)


@pytest.mark.parametrize(
    "fields",
    [
        {"use_sliding_window": True, "max_window_layers": 0},  # window absent: 4096, every layer
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
        {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},  # no layer
        {"use_sliding_window": True, "sliding_window": 16},  # max_window_layers 28: no layer
        {"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention"] * 2},
        {
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 9,
            "layer_types": ["full_attention", "sliding_attention"],
        },
        {"use_sliding_window": False, "sliding_window": 16, "max_window_layers": 0},
    ],
)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_sliding_windows_are_where_transformers_puts_them(family, fields) -> None:
    """The engine caps the context at the window where any layer has one (so full and windowed
    attention agree). A Qwen config with use_sliding_window but no sliding_window got no window
    (transformers: 4096, prompts past it silently differed), and one whose layers all attend fully
    (max_window_layers, layer_types) had its context cut to the window for nothing."""
    import transformers as tf

    cls = tf.Qwen2Config if family == "qwen2" else tf.Qwen3Config
    base = {**COMMON_CONFIG, "max_position_embeddings": 8192}
    hf = cls(**base, **fields)
    raw = {**base, **fields, "architectures": [f"{cls.__name__[:-6]}ForCausalLM"]}
    windowed = [hf.sliding_window for t in hf.layer_types if t == "sliding_attention"]
    if windowed:
        assert windowed[0] is not None  # transformers windows these layers
    cfg = ModelConfig.from_dict(raw)
    assert cfg.sliding_window == (windowed[0] if windowed else None)
    assert cfg.context_len == min([8192, *windowed])


# ---- rope scaling the engine does not implement --------------------------------------------------
@pytest.mark.parametrize("kind", ["dynamic", "yarn", "longrope"])
@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_an_unsupported_rope_type_is_refused_naming_the_field(kind, layout) -> None:
    scaling = {"factor": 2.0, "original_max_position_embeddings": 256}
    if layout == "rope_parameters":
        raw = {**COMMON_CONFIG, "rope_parameters": {**scaling, "rope_type": kind, "rope_theta": 1e4}}
        field = "rope_parameters.rope_type"
    else:
        raw = {**COMMON_CONFIG, "rope_theta": 1e4, "rope_scaling": {**scaling, "type": kind}}
        field = "rope_scaling.type"
    with pytest.raises(UnsupportedArchitectureError, match=rf"'{field}' is '{kind}'"):
        ModelConfig.from_dict({**raw, "architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize(
    "fields",
    [
        # a top-level rope_theta beside rope_parameters' own: transformers takes rope_parameters'
        {"rope_theta": 5e5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
        {"rope_theta": 5e5, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 2e4}},
        # the transformers 4 layout: rope_scaling wins over rope_parameters, theta from the top level
        {
            "rope_theta": 3e4,
            "rope_scaling": {"type": "linear", "factor": 4.0},
            "rope_parameters": {"rope_type": "linear", "factor": 2.0},
        },
        # llama3: a top-level original_max_position_embeddings wins over the scaling's own
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
                "rope_theta": 5e5,
            },
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_fields_are_read_with_transformers_precedence(untied_llama, tmp_path, fields) -> None:
    """A config.json holding rope settings in two places: the rotary frequencies are the ones
    transformers computes from it (the engine took the top-level rope_theta over
    rope_parameters' and ignored a top-level original_max_position_embeddings: every position
    past the first rotated differently, silently)."""
    from llmir_lang.executor.model_config import rope_inv_freq

    ckpt = shutil.copytree(untied_llama, tmp_path / "ckpt")
    edit_config(ckpt, **{"rope_parameters": ..., "rope_scaling": ..., **fields})
    hf = _hf_from(ckpt)
    assert torch.equal(rope_inv_freq(ModelConfig.from_folder(ckpt)), hf.model.rotary_emb.inv_freq)
    greedy_matches(ckpt, hf, PROMPTS, 6)
