"""Checkpoint weights the model does not use, as transformers treats them: the model loads, they
are ignored, and one warning names them. A weight the model needs and the checkpoint lacks stays a
CheckpointError (transformers would initialise it at random: a different model, silently).
Tiny random models (hidden 64, 2 layers); transformers loading the same folder is the oracle.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hf_fixtures import COMMON_CONFIG, build_hf_folder, edit_config, greedy_matches
from safetensors.torch import load_file, save_file

from llmir_lang.errors import CheckpointError
from llmir_lang.executor.loader import UnusedCheckpointWeightsWarning, load_model

CPU = torch.device("cpu")
PROMPTS = ([5, 17, 33, 2, 90, 101, 7], [250, 3, 3, 9, 60, 61, 62])


def _hf_from(folder: Path):
    """What transformers makes of the folder as it is now (fp32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _add_weights(folder: Path, extra: dict[str, torch.Tensor]) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state.update(extra)
    save_file(state, str(path), metadata={"format": "pt"})


def _unused_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UnusedCheckpointWeightsWarning)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A plain Llama checkpoint: attention_bias and mlp_bias off, untied."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("unexpected_llama")
    build_hf_folder(tf.LlamaConfig(**COMMON_CONFIG), folder)
    return folder


def test_unused_weights_are_ignored_with_one_warning_and_the_model_is_transformers(llama, tmp_path) -> None:
    """The loader refused a checkpoint with any weight it did not expect ("unexpected [...]");
    transformers warns and loads. Old Llama saves hold rotary_emb.inv_freq (recomputed, ignored
    silently by both), some hold biases their config turns off, some an extra head."""
    ckpt = shutil.copytree(llama, tmp_path / "ckpt")
    g = torch.Generator().manual_seed(1)
    h, kv = COMMON_CONFIG["hidden_size"], COMMON_CONFIG["num_key_value_heads"] * 16
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8, generator=g) for i in range(2)}
    # biases large enough that loading any of them would change the greedy tokens
    biases = {
        "model.layers.0.self_attn.q_proj.bias": torch.randn(h, generator=g),
        "model.layers.0.self_attn.k_proj.bias": torch.randn(kv, generator=g),
        "model.layers.0.self_attn.v_proj.bias": torch.randn(kv, generator=g),
        "model.layers.1.self_attn.o_proj.bias": torch.randn(h, generator=g),
        "model.layers.1.mlp.gate_proj.bias": torch.randn(COMMON_CONFIG["intermediate_size"], generator=g),
    }
    extra |= biases | {"v_head.summary.weight": torch.randn(1, h, generator=g)}
    _add_weights(ckpt, extra)
    hf = _hf_from(ckpt)
    assert hf.model.layers[0].self_attn.q_proj.bias is None  # transformers ignores them too

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(ckpt, CPU, torch.float32)
    (msg,) = _unused_warnings(caught)
    assert "6 weights" in msg and "ignored" in msg and "config.json" in msg
    assert "inv_freq" not in msg  # a rotary table is not a weight: recomputed, as in transformers
    assert "qkv_proj" not in msg and "gate_up_proj" not in msg  # the checkpoint's own names
    for name in sorted([*biases, "v_head.summary.weight"])[:5]:
        assert repr(name) in msg
    assert "..." in msg  # six names, five shown
    assert model.model.layers[0].self_attn.qkv_proj.bias is None
    with pytest.warns(UnusedCheckpointWeightsWarning):  # the Engine loads through the same path
        greedy_matches(ckpt, hf, PROMPTS, 8)


def test_a_bias_the_config_turns_on_is_loaded_and_off_is_ignored(tmp_path) -> None:
    """The same biases, with ``attention_bias`` / ``mlp_bias`` on, are the model's (fused, no
    warning); with them turned off in config.json, transformers drops them and so does the loader."""
    import transformers as tf

    on = tmp_path / "on"
    hf_on = build_hf_folder(tf.LlamaConfig(**COMMON_CONFIG, attention_bias=True, mlp_bias=True), on)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedCheckpointWeightsWarning)
        model = load_model(on, CPU, torch.float32)
    state = load_file(str(on / "model.safetensors"))
    qkv = [state[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.bias, torch.cat(qkv))
    assert torch.equal(model.model.layers[1].mlp.down_proj.bias, state["model.layers.1.mlp.down_proj.bias"])
    greedy_matches(on, hf_on, PROMPTS, 6)

    off = shutil.copytree(on, tmp_path / "off")
    edit_config(off, attention_bias=False, mlp_bias=False)
    hf_off = _hf_from(off)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(off, CPU, torch.float32)
    (msg,) = _unused_warnings(caught)
    assert "14 weights" in msg  # 2 layers x (q, k, v, o, gate, up, down)
    assert "'model.layers.0.mlp.down_proj.bias'" in msg and "qkv_proj" not in msg
    assert model.model.layers[1].self_attn.qkv_proj.bias is None
    with pytest.warns(UnusedCheckpointWeightsWarning):
        greedy_matches(off, hf_off, PROMPTS, 6)


def test_an_ignored_weight_is_not_shape_checked(llama, tmp_path) -> None:
    """A bias the config turns off is never used, so its shape is no error (transformers does
    not look at it either); fusing q/k/v checked it and refused the checkpoint."""
    ckpt = shutil.copytree(llama, tmp_path / "ckpt")
    _add_weights(ckpt, {f"model.layers.0.self_attn.{p}_proj.bias": torch.ones(3) for p in "qkv"})
    with pytest.warns(UnusedCheckpointWeightsWarning, match=r"3 weights.*q_proj\.bias"):
        load_model(ckpt, CPU, torch.float32)


def test_a_missing_weight_is_still_an_error_beside_unused_ones(llama, tmp_path) -> None:
    """transformers would initialise a missing weight at random and run; here it stays a
    CheckpointError naming it, and the unused weights are named too."""
    ckpt = shutil.copytree(llama, tmp_path / "ckpt")
    path = ckpt / "model.safetensors"
    state = load_file(str(path))
    state["model.layers.1.mlp.down_proj.weight_renamed"] = state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, str(path), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedCheckpointWeightsWarning)  # the error, not a warning first
        with pytest.raises(CheckpointError) as e:
            load_model(ckpt, CPU, torch.float32)
    msg = str(e.value)
    assert "missing ['model.layers.1.mlp.down_proj.weight']" in msg
    assert "down_proj.weight_renamed" in msg


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("attention_bias,mlp_bias", [(False, False), (True, True)])
def test_every_weight_transformers_uses_is_used(arch, attention_bias, mlp_bias, tmp_path) -> None:
    """An unused weight is only a warning now, so a weight transformers builds the model with and
    the engine's model lacks would silently change results: for every family and bias flag,
    transformers' own save loads with no unused weight (and none missing)."""
    import transformers as tf

    classes = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
    }
    build_hf_folder(
        classes[arch](**COMMON_CONFIG, attention_bias=attention_bias, mlp_bias=mlp_bias), tmp_path
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedCheckpointWeightsWarning)
        load_model(tmp_path, CPU, torch.float32)
