"""The loader fuses q/k/v and gate/up at load time; the fused rows are the checkpoint's, in order."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmir_lang.errors import CheckpointError
from llmir_lang.executor.loader import load_model


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_fused_weights_are_the_checkpoints_concatenated(arch, checkpoints) -> None:
    folder, hf = checkpoints(arch)
    model = load_model(folder, torch.device("cpu"), torch.float32)
    cfg = model.config
    hf_state = hf.state_dict()
    for i in (0, cfg.num_layers - 1):
        pre = f"model.layers.{i}."
        attn = model.model.layers[i].self_attn
        parts = [hf_state[f"{pre}self_attn.{p}_proj.weight"] for p in "qkv"]
        assert torch.equal(attn.qkv_proj.weight, torch.cat(parts))
        assert attn.qkv_proj.weight.shape[0] == (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        if cfg.attention_bias:  # Qwen2: the biases are fused the same way
            biases = [hf_state[f"{pre}self_attn.{p}_proj.bias"] for p in "qkv"]
            assert torch.equal(attn.qkv_proj.bias, torch.cat(biases))
        else:
            assert attn.qkv_proj.bias is None
        if cfg.qk_norm:
            assert torch.equal(attn.q_norm.weight, hf_state[f"{pre}self_attn.q_norm.weight"])
        mlp = model.model.layers[i].mlp
        gu = [hf_state[f"{pre}mlp.{p}_proj.weight"] for p in ("gate", "up")]
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat(gu))


def test_a_part_with_the_wrong_shape_is_named(checkpoints, tmp_path) -> None:
    folder, _ = checkpoints("llama")
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (st,) = tmp_path.glob("*.safetensors")
    state = load_file(str(st))
    key = "model.layers.1.self_attn.k_proj.weight"
    state[key] = state[key][:-1].contiguous()
    save_file(state, str(st), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="k_proj.weight"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
    # a missing part is reported as missing, not as a shape error
    del state[key]
    save_file(state, str(st), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


def test_cpu_fp32_projections_are_stored_column_major_with_the_same_values(checkpoints) -> None:
    folder, hf = checkpoints("llama")
    model = load_model(folder, torch.device("cpu"), torch.float32)
    layer = model.model.layers[0]
    for lin in (
        layer.self_attn.qkv_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_up_proj,
        layer.mlp.down_proj,
    ):
        w = lin.weight
        assert w.stride(0) == 1 and w.t().is_contiguous()  # [in, out] in memory
    assert model.output_weight().stride(0) == 1
    hf_state = hf.state_dict()
    assert torch.equal(layer.self_attn.o_proj.weight, hf_state["model.layers.0.self_attn.o_proj.weight"])
    assert torch.equal(layer.mlp.down_proj.weight, hf_state["model.layers.0.mlp.down_proj.weight"])
    # other dtypes keep the checkpoint's row-major layout
    bf16 = load_model(folder, torch.device("cpu"), torch.bfloat16)
    assert bf16.model.layers[0].self_attn.o_proj.weight.is_contiguous()


def test_a_missing_projection_is_named_by_its_own_name(checkpoints, tmp_path) -> None:
    """Fusing q/k/v made a missing k_proj read "missing qkv_proj, unexpected q_proj, v_proj"."""
    folder, _ = checkpoints("llama")
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (st,) = tmp_path.glob("*.safetensors")
    state = load_file(str(st))
    del state["model.layers.1.self_attn.k_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(st), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path, torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "missing ['model.layers.0.mlp.up_proj.weight', 'model.layers.1.self_attn.k_proj.weight']" in msg
    assert "unexpected []" in msg and "qkv_proj" not in msg and "gate_up_proj" not in msg
